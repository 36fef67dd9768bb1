"""The Anthropic Messages wire format (``POST /v1/messages``, what Claude Code speaks): bodies into the
core's ``RequestDraft``, events into Anthropic's JSON and server-sent events, errors into its error shape.

- ``system`` (a string or text blocks) becomes a leading system message; ``messages`` become chat turns:
  an assistant turn's ``tool_use`` blocks become its tool calls (``input`` as JSON text), a user turn's
  ``tool_result`` blocks become ``tool`` messages (before the turn's own text, in order).
- ``tools`` (``name``, ``description``, ``input_schema``) and ``tool_choice`` (``auto``, ``any`` = required,
  ``tool`` = named, ``none``; ``disable_parallel_tool_use``) map onto the core's tools.
- The stream is Anthropic's event order: ``message_start``, ``ping``, then per content block
  ``content_block_start`` / ``content_block_delta`` (``text_delta``, ``input_json_delta``) /
  ``content_block_stop``, then ``message_delta`` (``stop_reason``, usage) and ``message_stop``.

Hints that change nothing a model served here can do are accepted and dropped (``metadata``,
``cache_control``, ``thinking``, ``context_management``, ``output_config.effort``); anything else the gateway
cannot honour is a 400 naming it, as on the OpenAI door. ``max_tokens`` is a ceiling, as Anthropic's is:
lowered to ``gateway.limits.max_tokens_limit`` and to what the context leaves after the prompt. Errors
name the body's own fields: the core's ``messages[i]`` is renamed to the Anthropic message it came from.
"""

from __future__ import annotations

import json

from gateway.core.events import Delta, Done, Started
from gateway.doors.openai_api import (
    HEADER_NAMES,
    Reading,
    Shape,
    function_tool,
    header_fields,
    json_number,
    read_with,
    text_parts,
)
from gateway.errors import RpcError, clip, http_status, invalid_argument
from gateway.request import RequestDraft, ToolUse, estimate_prompt_tokens
from igw_worker_api.v1 import worker_pb2 as wpb

DOOR = "anthropic"
_KNOWN = {
    "model",
    "messages",
    "system",
    "max_tokens",
    "stop_sequences",
    "temperature",
    "top_p",
    "stream",
    "tools",
    "tool_choice",
    "metadata",
}
# Accepted when they ask for what the gateway does anyway.
_NEUTRAL = {"top_k": (None,), "service_tier": (None, "auto", "standard_only")}
# Hints about how a Claude model should work, which change nothing a model served here can do: accepted and
# dropped (Claude Code sends all of them on every request). ``output_config.format`` is not a hint.
_HINTS = {"thinking", "context_management", "output_config", "cache_control", "speed"}

NAMES = {
    **HEADER_NAMES,
    "sampling.max_tokens": "max_tokens",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.stop": "stop_sequences",
    "tools[].parameters_json_schema": "tools[].input_schema",
    "task": "messages",
}

# HTTP status -> Anthropic's error type.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _bad(param: str, message: str) -> RpcError:
    return invalid_argument(param, message)


def _text_blocks(value, param: str) -> str:
    """``system`` or a tool result's content: a string, or text blocks (one per line)."""
    return text_parts(value, param, sep="\n")


def _turn(m, i: int) -> list[wpb.ChatMessage]:
    """One Anthropic message as the core's chat messages."""
    if not isinstance(m, dict):
        raise _bad(f"messages[{i}]", "must be an object with role and content")
    role, content = m.get("role"), m.get("content")
    if role not in ("user", "assistant", "system"):  # system: a mid-conversation instruction (Claude Code's)
        raise _bad(f"messages[{i}].role", "must be user, assistant or system")
    if isinstance(content, str):
        return [wpb.ChatMessage(role=role, content=content)]
    if not isinstance(content, list):
        raise _bad(f"messages[{i}].content", "must be a string or a list of content blocks")
    text, calls, results = [], [], []
    for j, block in enumerate(content):
        param = f"messages[{i}].content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            text.append(block["text"])
        elif kind == "tool_use" and role == "assistant":
            name, call_id, arguments = block.get("name"), block.get("id"), block.get("input", {})
            if not isinstance(name, str) or not isinstance(call_id, str) or not isinstance(arguments, dict):
                raise _bad(param, "a tool_use block has a string id and name and an object input")
            calls.append(wpb.ToolCall(id=call_id, name=name, arguments_json=json.dumps(arguments, ensure_ascii=False)))
        elif kind == "tool_result" and role == "user":
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str):
                raise _bad(f"{param}.tool_use_id", "must be a string")
            result = _text_blocks(block.get("content", ""), f"{param}.content")
            if block.get("is_error") is True:
                result = "Error: " + result
            results.append(wpb.ChatMessage(role="tool", content=result, tool_call_id=call_id))
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # earlier reasoning: not sent back to a model that did not make it
        else:
            raise _bad(param, "only text, tool_use (assistant) and tool_result (user) blocks are supported")
    out = results
    if text or calls or not results:
        out = [*results, wpb.ChatMessage(role=role, content="".join(text), tool_calls=calls)]
    return out


def _tools(body: dict) -> ToolUse | None:
    raw, choice = body.get("tools"), body.get("tool_choice")
    if raw is None and choice is None:
        return None
    if not isinstance(raw, list):
        raise _bad("tools", "must be a list of tools")
    tools = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or t.get("type", "custom") != "custom":
            raise _bad(f"tools[{i}]", "only custom tools (name, description, input_schema) are supported")
        if not isinstance(t.get("input_schema"), dict):
            raise _bad(f"tools[{i}].input_schema", "must be a JSON object (a schema)")
        tools.append(function_tool(t, f"tools[{i}]", "input_schema"))
    if choice is None:
        return ToolUse(tuple(tools))
    kind = choice.get("type") if isinstance(choice, dict) else None
    parallel = choice.get("disable_parallel_tool_use") is not True if isinstance(choice, dict) else True
    if kind in ("auto", "none"):
        return ToolUse(tuple(tools), kind, "", parallel)
    if kind == "any":
        return ToolUse(tuple(tools), "required", "", parallel)
    if kind == "tool" and isinstance(choice.get("name"), str):
        return ToolUse(tuple(tools), "named", choice["name"], parallel)
    raise _bad(
        "tool_choice", 'one of {"type": "auto"}, {"type": "any"}, {"type": "tool", "name": ...}, {"type": "none"}'
    )


def _read(body, headers: dict[str, str]) -> tuple[RequestDraft, Shape, dict[str, str]]:
    if not isinstance(body, dict):
        raise _bad("body", "the body must be a JSON object")
    for key, value in body.items():
        if key in _HINTS:
            if key == "output_config" and isinstance(value, dict) and value.get("format") is not None:
                raise _bad("output_config.format", "structured output is not served on this API; use response_format")
            continue
        if key not in _KNOWN and not any(value == v for v in _NEUTRAL.get(key, ())):
            raise _bad(clip(str(key), 40), "this gateway does not support this parameter (or this value of it)")
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise _bad("model", "not a model name (GET /v1/models lists them)")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "must be true or false")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise _bad("max_tokens", "a positive integer is required")
    stops = body.get("stop_sequences") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop_sequences", "must be a list of strings")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _bad("messages", "a non-empty list of messages is required")
    messages: list[wpb.ChatMessage] = []
    names = dict(NAMES)
    system = body.get("system")
    if system is not None:
        names[f"messages[{len(messages)}]"] = "system"
        messages.append(wpb.ChatMessage(role="system", content=_text_blocks(system, "system")))
    for i, m in enumerate(raw):
        for turn in _turn(m, i):
            names[f"messages[{len(messages)}]"] = f"messages[{i}]"
            messages.append(turn)
    draft = RequestDraft(
        model=model,
        messages=tuple(messages),
        max_tokens=max_tokens,
        max_tokens_ceiling=True,  # Claude Code asks 32,000 of every model: as much as fits
        temperature=json_number(body, "temperature"),
        top_p=json_number(body, "top_p"),
        stop=tuple(stops),
        tools=_tools(body),
        **header_fields(
            headers, metadata.get("user_id") if isinstance(metadata := body.get("metadata"), dict) else None
        ),
    )
    return draft, Shape("messages", model, stream, True), names


def messages_request(body, headers: dict[str, str]) -> Reading:
    """POST /v1/messages, read."""
    return read_with(_read, body, headers, NAMES)


def count_tokens(body, headers: dict[str, str]) -> tuple[RequestDraft, dict[str, str]]:
    """POST /v1/messages/count_tokens, read (``max_tokens`` is not needed there)."""
    if isinstance(body, dict) and "max_tokens" not in body:
        body = {**body, "max_tokens": 1}
    draft, _, names = _read(body, headers)
    return draft, names


def token_estimate(messages, tools_bytes: int) -> dict:
    """count_tokens' answer: the gateway's estimate (the worker has the tokenizer and counts exactly only
    when it runs the request; ``usage.input_tokens`` of an answer is exact)."""
    return {"input_tokens": estimate_prompt_tokens(messages, tools_bytes)}


def error_body(err: RpcError, names: dict[str, str] = NAMES) -> tuple[int, dict]:
    err = err.renamed(names)
    status = http_status(err.code)
    kind = ERROR_TYPES.get(status, "api_error")
    message = f"{err.field}: {err.message}" if err.field and not err.message.startswith(err.field) else err.message
    return status, {"type": "error", "error": {"type": kind, "message": message}}


def event(name: str, data: dict) -> bytes:
    """One of Anthropic's server-sent events: ``event:`` and ``data:``."""
    return f"event: {name}\ndata: ".encode() + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


class Answer:
    """Builds one request's answer in Anthropic's shape: content blocks (text, tool_use), stop_reason."""

    def __init__(self, shape: Shape, started: Started):
        self.id = "msg_" + started.request_id
        self.model = shape.model
        self.blocks: list[dict] = []  # whole answers: the content blocks so far
        self.open: str | None = None  # streams: the kind of the open block ("text", "tool_use")
        self.index = -1

    def _message(self, content: list, stop_reason, usage: dict) -> dict:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }

    # --- streams ---

    def frames(self, ev) -> list[bytes]:
        if isinstance(ev, Started):
            self.model = ev.model
            usage = {"input_tokens": ev.prompt_tokens, "output_tokens": 0}
            start = event("message_start", {"type": "message_start", "message": self._message([], None, usage)})
            return [start, event("ping", {"type": "ping"})]
        if isinstance(ev, Delta):
            out = []
            if ev.text:
                out += self._switch("text", {"type": "text", "text": ""})
                delta = {"type": "text_delta", "text": ev.text}
                out.append(
                    event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})
                )
            for c in ev.tool_calls:
                if c.id or c.name:
                    out += self._switch("tool_use", {"type": "tool_use", "id": c.id, "name": c.name, "input": {}}, True)
                if c.arguments:
                    delta = {"type": "input_json_delta", "partial_json": c.arguments}
                    out.append(
                        event(
                            "content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta}
                        )
                    )
            return out
        out = self._close()
        delta = {"stop_reason": STOP_REASONS.get(ev.finish_reason, "end_turn"), "stop_sequence": None}
        usage = {"input_tokens": ev.prompt_tokens, "output_tokens": ev.completion_tokens}
        out.append(event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
        out.append(event("message_stop", {"type": "message_stop"}))
        return out

    def _switch(self, kind: str, block: dict, new: bool = False) -> list[bytes]:
        """Open a block of ``kind`` unless one is open (a new tool call always opens its own)."""
        if self.open == kind and not new:
            return []
        out = self._close()
        self.index += 1
        self.open = kind
        out.append(
            event("content_block_start", {"type": "content_block_start", "index": self.index, "content_block": block})
        )
        return out

    def _close(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [event("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def error_frames(self, err: RpcError, names: dict[str, str]) -> list[bytes]:
        return [event("error", error_body(err, names)[1])]

    def keepalive(self) -> bytes:
        """While the model is silent (a long prefill): Anthropic's own ping event."""
        return event("ping", {"type": "ping"})

    # --- whole answers ---

    def add(self, ev) -> None:
        if isinstance(ev, Started):
            self.model = ev.model
        elif isinstance(ev, Delta):
            if ev.text:
                if self.blocks and self.blocks[-1]["type"] == "text":
                    self.blocks[-1]["text"] += ev.text
                else:
                    self.blocks.append({"type": "text", "text": ev.text})
            for c in ev.tool_calls:
                if c.id or c.name:
                    self.blocks.append({"type": "tool_use", "id": c.id, "name": c.name, "input": ""})
                if self.blocks and self.blocks[-1]["type"] == "tool_use":
                    self.blocks[-1]["input"] += c.arguments

    def result(self, ev: Done) -> dict:
        for b in self.blocks:
            if b["type"] == "tool_use":
                try:
                    b["input"] = json.loads(b["input"] or "{}")
                except ValueError:
                    b["input"] = {"_unparsed_arguments": b["input"]}  # a model's malformed call (auto), kept
        usage = {"input_tokens": ev.prompt_tokens, "output_tokens": ev.completion_tokens}
        return self._message(self.blocks, STOP_REASONS.get(ev.finish_reason, "end_turn"), usage)
