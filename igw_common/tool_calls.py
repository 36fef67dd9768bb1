"""Tool calling where the model's words are made: the prompt that shows the tools, the grammar that forces
a call, and the parser that turns the output into calls. Shared by our worker and by the gateway's client
of stock vLLM gRPC servers (which render and detokenize on the gateway's side).

The format is Hermes' (Qwen2.5, Hermes, many fine-tunes): a call is written as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Oslo"}}
    </tool_call>

- **Prompt.** A model whose chat template takes ``tools`` renders them itself. For a template without
  tools (the embedded SmolLM2's), ``conversation`` adds ``FALLBACK_SYSTEM_PROMPT``: the tools as JSON in a
  system message and the format above; earlier calls are written back into the assistant turns in that
  format, and tool results become user turns wrapped in ``<tool_response>``.
- **Grammar.** A ``required`` or named tool choice is enforced with a Lark grammar (llguidance's dialect:
  ``%json`` embeds a JSON schema) whose calls can only name the allowed tools with arguments that
  validate against their schemas; ``auto`` is not constrained.
- **Parser.** ``HermesParser`` streams calls out of the text as it grows: the text before the first call
  as content, each call's name once, its arguments in pieces. Our own worker uses vLLM's parsers instead
  (``inference.tool_parsing``, chosen per model); this one is for where vLLM is not installed: the
  gateway (stock vLLM gRPC members) and the synthetic engine.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass

START, END = "<tool_call>", "</tool_call>"

FALLBACK_SYSTEM_PROMPT = (
    "You may call functions to help with the user's request. The functions, as JSON schemas:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call a function, write its name and arguments as one JSON object between tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <arguments-object>}}\n</tool_call>\n'
    "A function's result comes back in a later turn between <tool_response> tags."
)

_ALPHABET = string.ascii_letters + string.digits


def make_call_id() -> str:
    """A call id as OpenAI's look: ``call_`` and 24 letters and digits."""
    return "call_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A request's tools, as the worker needs them: each ``(name, description, parameters schema)``;
    ``choice`` is "auto", "none", "required" or "named" (``name`` then says which)."""

    tools: tuple[tuple[str, str, dict], ...]
    choice: str = "auto"
    name: str = ""
    parallel: bool = True

    @classmethod
    def of(cls, tools, choice: str, name: str, parallel: bool) -> ToolSpec:
        """From Tool messages (either protocol's): a schema that is not JSON raises ValueError."""
        specs = []
        for t in tools:
            schema = json.loads(t.parameters_json_schema) if t.parameters_json_schema else {"type": "object"}
            specs.append((t.name, t.description, schema))
        return cls(tuple(specs), choice, name, parallel)

    @property
    def parses(self) -> bool:
        """Whether the output is read for calls (``none`` shows the tools but answers in text)."""
        return self.choice != "none"

    def openai_tools(self) -> list[dict]:
        """The tools in the shape chat templates (and vLLM's parsers) expect."""
        return [
            {"type": "function", "function": {"name": n, "description": d, "parameters": p}} for n, d, p in self.tools
        ]


def template_knows_tools(template_source: str | None) -> bool:
    """Whether a chat template renders ``tools`` itself (every tool-aware template reads the variable)."""
    return bool(template_source) and re.search(r"\btools\b", template_source) is not None


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text  # a template writes what it was given


def conversation(messages, spec: ToolSpec | None, native: bool) -> tuple[list[dict], list[dict] | None]:
    """The chat template's ``messages`` and ``tools`` for a conversation (``messages``: ChatMessage
    protos). ``native``: the template renders tools, calls and results itself."""
    if native:
        out = []
        for m in messages:
            msg: dict = {"role": m.role, "content": m.content}
            if m.tool_calls:
                msg["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": _arguments(c.arguments_json)},
                    }
                    for c in m.tool_calls
                ]
            if m.tool_call_id:
                msg["tool_call_id"] = m.tool_call_id
            out.append(msg)
        return out, (spec.openai_tools() if spec else None)
    out = []
    for m in messages:
        if m.role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.content}\n</tool_response>"})
            continue
        content = m.content
        for c in m.tool_calls:
            call = json.dumps({"name": c.name, "arguments": _arguments(c.arguments_json)}, ensure_ascii=False)
            content += ("\n" if content else "") + f"{START}\n{call}\n{END}"
        out.append({"role": m.role, "content": content})
    if spec is not None:
        shown = "\n".join(json.dumps(t, ensure_ascii=False) for t in spec.openai_tools())
        prompt = FALLBACK_SYSTEM_PROMPT.format(tools=shown)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


# Compact, predictable JSON inside the calls: no whitespace for a small model to wander in.
_JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def forced_grammar(spec: ToolSpec) -> str | None:
    """The Lark grammar (llguidance) a ``required`` or named choice constrains the output with; None for
    ``auto`` and ``none``."""
    if spec.choice not in ("required", "named"):
        return None
    allowed = [t for t in spec.tools if spec.choice == "required" or t[0] == spec.name]
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": n}, "arguments": p},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for n, _, p in allowed
    ]
    schema = {"x-guidance": _JSON_STYLE, **(calls[0] if len(calls) == 1 else {"anyOf": calls})}
    many = spec.choice == "required" and spec.parallel
    start = 'start: call ("\\n" call)*' if many else "start: call"
    return f'{start}\ncall: "{START}\\n" %json {json.dumps(schema)} "\\n{END}"\n'


@dataclass(slots=True)
class CallDelta:
    """A piece of a tool call: ``id`` and ``name`` in its first piece only."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


def join_calls(calls: list[list[str]], pieces) -> None:
    """Add streamed ``pieces`` (CallDelta or ToolCallDelta) to ``calls``, each ``[id, name, arguments]``: a
    piece with an id or name (a call's first) starts a call, the others add to their call's arguments."""
    for p in pieces:
        if p.id or p.name or p.index >= len(calls):
            calls.append([p.id, p.name, ""])
        calls[min(p.index, len(calls) - 1)][2] += p.arguments


def _complete_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _partial_tag(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` could begin ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


_NAME = re.compile(r'"name"\s*:\s*"([^"]+)"')
_ARGS = re.compile(r'"arguments"\s*:\s*')


class HermesParser:
    """Hermes-format calls out of a growing text (``feed`` each new piece, ``finish`` at the end).

    Text before the first call is content (a possible start of a tag is held until it is not); text
    after it, outside calls, is dropped. A call's arguments stream as the text after ``"arguments":``,
    less the closing brace of the call's object once that is complete."""

    def __init__(self) -> None:
        self.text = ""
        self.content_sent = 0
        self.calls: list[list[str]] = []  # per call: [name, arguments sent]

    @property
    def called(self) -> bool:
        return bool(self.calls)

    def feed(self, piece: str, token_ids=()) -> tuple[str, list[CallDelta]]:
        self.text += piece
        first = self.text.find(START)
        end = first if first >= 0 else len(self.text) - _partial_tag(self.text, START)
        content = self.text[self.content_sent : end] if end > self.content_sent else ""
        self.content_sent = max(self.content_sent, end)
        return content, (self._calls(first) if first >= 0 else [])

    def finish(self) -> tuple[str, list[CallDelta]]:
        if self.calls or START in self.text:
            return "", []
        rest, self.content_sent = self.text[self.content_sent :], len(self.text)
        return rest, []

    def _calls(self, pos: int) -> list[CallDelta]:
        out: list[CallDelta] = []
        index = 0
        while pos >= 0:
            body_at = pos + len(START)
            close = self.text.find(END, body_at)
            if close >= 0:
                body, complete = self.text[body_at:close].strip(), True
            else:
                raw = self.text[body_at:]
                body = raw[: len(raw) - _partial_tag(raw, END)].strip()
                complete = _complete_json(body)
            if index == len(self.calls):
                name = _NAME.search(body)
                if name is None:
                    break  # this call's name is not whole yet
                self.calls.append([name.group(1), ""])
                out.append(CallDelta(index, id=make_call_id(), name=name.group(1)))
            args = _ARGS.search(body)
            if args is not None:
                raw_args = body[args.end() :]
                if complete:
                    raw_args = raw_args.rstrip()
                    raw_args = raw_args[:-1].rstrip() if raw_args.endswith("}") else raw_args
                sent = self.calls[index][1]
                if len(raw_args) > len(sent) and raw_args.startswith(sent):
                    out.append(CallDelta(index, arguments=raw_args[len(sent) :]))
                    self.calls[index][1] = raw_args
            if close < 0:
                break
            index += 1
            pos = self.text.find(START, close + len(END))
        return out
