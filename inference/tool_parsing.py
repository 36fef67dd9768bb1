"""vLLM's tool parsers on our worker: the model's output becomes tool calls here, step by step.

The parser is vLLM's own, chosen per model by ``worker.vllm.tool_parser`` (the names of vLLM's
``--tool-call-parser``), fed exactly as vLLM's OpenAI server feeds it: the text and token ids so far and
the step's delta, with an OpenAI-shaped request that carries the tools. This adapter only turns its
``DeltaMessage``s into ``CallDelta``s, gives each call an id if the parser did not, and at the end sends
what the parser held (content that never became a call; arguments it had parsed but not streamed).
"""

from __future__ import annotations

from igw_common.tool_calls import CallDelta, ToolSpec, make_call_id
from inference.engine import ToolCallParser


def parser_class(name: str):
    """vLLM's parser class registered under ``name``; ValueError naming the known ones otherwise."""
    from vllm.tool_parsers import ToolParserManager

    try:
        return ToolParserManager.get_tool_parser(name)
    except KeyError:
        known = ", ".join(sorted(ToolParserManager.list_registered()))
        raise ValueError(f"worker.vllm.tool_parser: no vLLM tool parser is named {name!r}; known: {known}") from None


def _tool_choice(spec: ToolSpec):
    if spec.choice == "named":
        return {"type": "function", "function": {"name": spec.name}}
    return spec.choice


class VllmToolCalls(ToolCallParser):
    def __init__(self, cls, tokenizer, spec: ToolSpec, model: str):
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        self.request = ChatCompletionRequest(
            model=model,
            messages=[],
            tools=spec.openai_tools(),
            tool_choice=_tool_choice(spec),
            parallel_tool_calls=spec.parallel,
        )
        self.parser = cls(tokenizer, self.request.tools)
        self.text = ""
        self.token_ids: list[int] = []
        self.content = ""  # sent as content so far
        self.last_index = -1
        self.called = False

    def feed(self, text: str, token_ids: tuple[int, ...] = ()) -> tuple[str, list[CallDelta]]:
        previous, previous_ids = self.text, self.token_ids
        self.text += text
        self.token_ids = previous_ids + list(token_ids)  # a new list: the parser may keep the previous one
        message = self.parser.extract_tool_calls_streaming(
            previous, self.text, text, previous_ids, self.token_ids, list(token_ids), self.request
        )
        if message is None:
            return "", []
        content = message.content or ""
        self.content += content
        calls = []
        for tc in message.tool_calls or ():
            fn = tc.function
            name = (fn.name if fn is not None else None) or ""
            call_id = tc.id or ""
            if tc.index > self.last_index:  # a new call: the first piece carries its id and name
                self.last_index, self.called = tc.index, True
                call_id = call_id or make_call_id()
            calls.append(CallDelta(tc.index, id=call_id, name=name, arguments=(fn.arguments if fn else None) or ""))
        return content, calls

    def finish(self) -> tuple[str, list[CallDelta]]:
        if not self.called:
            # Text the parser held back in case it began a call (a partial tag).
            rest = self.text[len(self.content) :] if self.text.startswith(self.content) else ""
            self.content = self.text
            return rest, []
        if len(self.parser.prev_tool_call_arr) - 1 != self.last_index:
            return "", []  # the parser's last entry is a call cut off before its name: nothing to finish
        remaining = self.parser.get_remaining_unstreamed_args()
        return "", [CallDelta(self.last_index, arguments=remaining)] if remaining else []
