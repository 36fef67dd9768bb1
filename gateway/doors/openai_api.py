"""The OpenAI wire format: bodies into the core's ``RequestDraft``, events into OpenAI JSON, errors
into OpenAI error bodies.

Only what the HTTP front door (``gateway.doors.http_server``) needs to speak the subset of the OpenAI
API that IDE assistants and SDKs use: ``/v1/chat/completions``, ``/v1/completions`` (with ``suffix``
for fill-in-the-middle) and ``/v1/models``. This module checks only what JSON itself needs (types,
role aliases, text parts); every limit is the core's one validator's, and its errors come back named
as the client named the field (``NAMES``: ``max_tokens``, ``x-igw-session-id``, ...).

A parameter the gateway does not support is refused with 400 naming it, never silently ignored,
unless it asks for exactly what the gateway does anyway (``n: 1``, ``presence_penalty: 0``,
``logprobs: false``, ...).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass

from gateway.core.events import Delta, Done, Started
from gateway.core.validation import MAX_STREAM_INTERVAL_MS, header_number
from gateway.errors import RpcError, clip, http_status, invalid_argument
from gateway.request import Constraint, RequestDraft, ToolUse
from igw_common.tool_calls import join_calls
from igw_worker_api.v1 import worker_pb2 as wpb

DOOR = "http"  # the request log's name for this API's requests

# Parameters accepted when they ask for what the gateway does anyway (OpenAI's defaults).
_NEUTRAL = {
    "n": (1, None),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logprobs": (False, None),
    "top_logprobs": (0, None),
    "echo": (False, None),
    "best_of": (1, None),
    "logit_bias": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None,),
}
_SHARED = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "stop", "seed", "user"}
_CHAT = _SHARED | {
    "messages",
    "max_completion_tokens",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
}
_COMPLETION = _SHARED | {"prompt", "suffix"}
# Roles: "developer" is OpenAI's newer name for "system".
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}

# HTTP status -> OpenAI's error type.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
    499: "cancelled",
    503: "service_unavailable",
    504: "timeout",
}
# Headers in which agents send their own conversation's id (Claude Code; Codex CLI): the worker affinity
# of the conversation's turns, so they reuse one worker's prefix cache (never a server-side session).
AGENT_SESSION_HEADERS = ("x-claude-code-session-id", "session-id", "session_id", "x-codex-session-id")
# The core's fields that every HTTP API takes from the gateway's own headers.
HEADER_NAMES = {
    "request_id": "x-igw-request-id",
    "session_id": "x-igw-session-id",
    "supersede_key": "x-igw-supersede-key",
    "priority": "x-igw-priority",
    "stream_interval_ms": "x-igw-stream-interval-ms",
    "affinity_id": "session_id",
}
# The core's field names as this door's clients call them (the body's parameters and igw headers).
NAMES = {
    **HEADER_NAMES,
    "sampling.max_tokens": "max_tokens",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.stop": "stop",
    "sampling.seed": "seed",
    "task": "messages",
    "constraint": "response_format",
    "constraint.json_schema": "response_format.json_schema.schema",
    "tools[].name": "tools[].function.name",
    "tools[].parameters_json_schema": "tools[].function.parameters",
    "messages[].tool_calls[].name": "messages[].tool_calls[].function.name",
    "messages[].tool_calls[].arguments_json": "messages[].tool_calls[].function.arguments",
}
SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for response_format.json_schema.name


@dataclass(frozen=True, slots=True)
class Shape:
    """How to answer: what the body asked of the answer's form, not of the request."""

    kind: str  # "chat" or "completion"
    model: str  # as asked, until `started` names the model that answers
    stream: bool
    include_usage: bool
    session_id: str = ""  # the server-side session the answer is a turn of (stored responses)


@dataclass(frozen=True, slots=True)
class Reading:
    """A body as this door read it: the draft for the core (or the error reading met), how to answer,
    and the names the client's fields go by."""

    draft: RequestDraft | RpcError
    shape: Shape | None
    names: dict[str, str]


def _bad(param: str, message: str) -> RpcError:
    return invalid_argument(param, message)


def _is_neutral(key: str, value) -> bool:
    """``value`` asks for exactly what the gateway does anyway (None, False and True match only themselves)."""
    return any(
        value is v if v is None or isinstance(v, bool) else value == v and not isinstance(value, bool)
        for v in _NEUTRAL.get(key, ())
    )


def _check_known(body: dict, allowed: set[str]) -> None:
    for key, value in body.items():
        if key not in allowed and not _is_neutral(key, value):
            raise _bad(
                clip(str(key), 40), "this gateway does not support this parameter (or this value of it); leave it out"
            )


def json_number(body: dict, key: str) -> float | None:
    """``body[key]``: a finite number (not a boolean), or None."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(key, "must be a number")
    return float(value)


def _integer(body: dict, key: str, what: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(key, what)
    return value


def text_parts(value, param: str, kinds: tuple[str, ...] = ("text",), sep: str = "") -> str:
    """Content as every HTTP API sends it: a string, or a list of ``{"type": <one of kinds>, "text"}`` parts
    joined with ``sep`` (images and files are refused, naming the part)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad(param, "must be a string or a list of text parts")
    out = []
    for i, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") not in kinds or not isinstance(part.get("text"), str):
            raise _bad(f"{param}[{i}]", f"only text parts ({', '.join(kinds)}) are supported")
        out.append(part["text"])
    return sep.join(out)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "must be a string or a list of strings")
    return tuple(stops)


def _common(body, headers: dict[str, str], kind: str, max_tokens_keys: tuple[str, ...]) -> tuple[dict, Shape]:
    """What chat and text completions share: the draft's common fields and the answer's shape."""
    if not isinstance(body, dict):
        raise _bad("body", "the body must be a JSON object")
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise _bad("model", "not a model name (GET /v1/models lists them)")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _bad("stream_options", "only include_usage is supported")
    if options and not stream:
        raise _bad("stream_options", "only allowed with stream: true")
    cache = headers.get("x-igw-cache", "")
    if cache not in ("", "bypass"):
        raise _bad("x-igw-cache", 'only "bypass" (skip the response cache) is supported')
    interval = headers.get("x-igw-stream-interval-ms")
    given = [k for k in max_tokens_keys if body.get(k) is not None]
    fields = {
        "model": model,
        "max_tokens": _integer(body, given[0], "must be a positive integer") if given else None,
        "temperature": json_number(body, "temperature"),
        "top_p": json_number(body, "top_p"),
        "stop": _stop(body),
        "seed": _integer(body, "seed", "must be a 64-bit integer"),
        **header_fields(headers),
        "cache_bypass": cache == "bypass",
        "stream_interval_ms": None
        if interval is None
        else header_number(interval, "x-igw-stream-interval-ms", 0, MAX_STREAM_INTERVAL_MS),
    }
    return fields, Shape(kind, model, stream, bool(options.get("include_usage")))


def _names(body, max_tokens_keys: tuple[str, ...]) -> dict[str, str]:
    """NAMES, with max_tokens named as the body named it (chat has two names for it)."""
    if isinstance(body, dict):
        given = [k for k in max_tokens_keys if body.get(k) is not None]
        if given and given[0] != "max_tokens":
            return {**NAMES, "sampling.max_tokens": given[0]}
    return NAMES


def _read(parse, body, headers: dict[str, str], keys: tuple[str, ...]) -> Reading:
    names = _names(body, keys)
    try:
        draft, shape = parse(body, headers)
    except RpcError as err:
        return Reading(err, None, names)
    return Reading(draft, shape, names)


def _chat(body, headers: dict[str, str]) -> tuple[RequestDraft, Shape]:
    fields, shape = _common(body, headers, "chat", ("max_completion_tokens", "max_tokens"))
    _check_known(body, _CHAT)
    constraint = _response_format(body.get("response_format"))
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _bad("messages", "a non-empty list of messages is required")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "must be an object with role and content")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"messages[{i}].role", f"must be one of {', '.join(_ROLES)}")
        content = text_parts(m.get("content") or "", f"messages[{i}].content")
        calls = _calls(m.get("tool_calls"), f"messages[{i}].tool_calls")
        call_id = m.get("tool_call_id") or ""
        if not isinstance(call_id, str):
            raise _bad(f"messages[{i}].tool_call_id", "must be a string")
        messages.append(wpb.ChatMessage(role=_ROLES[role], content=content, tool_calls=calls, tool_call_id=call_id))
    return RequestDraft(messages=tuple(messages), constraint=constraint, tools=_tools(body), **fields), shape


def _calls(raw, param: str) -> list[wpb.ToolCall]:
    """An assistant message's ``tool_calls``: [{id, type: function, function: {name, arguments}}]."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _bad(param, "must be a list of tool calls")
    out = []
    for j, c in enumerate(raw):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or c.get("type", "function") != "function":
            raise _bad(f"{param}[{j}]", 'must be {"id": ..., "type": "function", "function": {"name", "arguments"}}')
        name, arguments, call_id = fn.get("name"), fn.get("arguments", ""), c.get("id", "")
        if not isinstance(name, str) or not isinstance(arguments, str) or not isinstance(call_id, str):
            raise _bad(f"{param}[{j}]", "id, function.name and function.arguments (JSON text) must be strings")
        out.append(wpb.ToolCall(id=call_id, name=name, arguments_json=arguments))
    return out


def header_fields(headers: dict[str, str], conversation=None) -> dict:
    """The draft's fields every HTTP API takes from the gateway's own headers (and an agent's session
    header; else ``conversation``, an id the body names its conversation by, if a string)."""
    agent = next((headers[h] for h in AGENT_SESSION_HEADERS if headers.get(h)), "")
    return {
        "request_id": headers.get("x-igw-request-id", ""),
        "priority": headers.get("x-igw-priority", "") or None,
        "session_id": headers.get("x-igw-session-id", ""),
        "supersede_key": headers.get("x-igw-supersede-key", ""),
        "affinity_id": agent or (conversation if isinstance(conversation, str) else ""),
    }


def function_tool(fn: dict, param: str, schema_key: str = "parameters") -> wpb.Tool:
    """A function tool's name, description and arguments schema (under ``schema_key``), JSON types only:
    the validator bounds them."""
    name, description, schema = fn.get("name"), fn.get("description") or "", fn.get(schema_key)
    if not isinstance(name, str):
        raise _bad(f"{param}.name", "must be a string")
    if not isinstance(description, str):
        raise _bad(f"{param}.description", "must be a string")
    if schema is not None and not isinstance(schema, dict):
        raise _bad(f"{param}.{schema_key}", "must be a JSON object (a schema)")
    text = json.dumps(schema, ensure_ascii=False) if schema is not None else ""
    return wpb.Tool(name=name, description=description, parameters_json_schema=text)


def read_with(parse, body, headers: dict[str, str], names: dict[str, str]) -> Reading:
    """A body read by ``parse`` (draft, shape and the request's own names), or the error reading met."""
    try:
        draft, shape, own_names = parse(body, headers)
    except RpcError as err:
        return Reading(err, None, names)
    return Reading(draft, shape, own_names)


def _tools(body: dict) -> ToolUse | None:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls``; JSON types only (the validator bounds them)."""
    raw, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if raw is None and choice in (None, "none", "auto"):
        if parallel not in (None, True, False):
            raise _bad("parallel_tool_calls", "must be true or false")
        return None
    if not isinstance(raw, list):
        raise _bad("tools", "must be a list of function tools")
    tools = []
    for i, t in enumerate(raw):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or t.get("type") != "function":
            raise _bad(f"tools[{i}]", 'only function tools: {"type": "function", "function": {"name", ...}}')
        if fn.get("strict") not in (None, True, False):
            raise _bad(f"tools[{i}].function.strict", "must be true or false")
        tools.append(function_tool(fn, f"tools[{i}].function"))
    if parallel not in (None, True, False):
        raise _bad("parallel_tool_calls", "must be true or false")
    parallel = parallel is not False
    if choice in (None, "auto", "none", "required"):
        return ToolUse(tuple(tools), choice or "auto", "", parallel)
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _bad("tool_choice", '"auto", "none", "required" or {"type": "function", "function": {"name": ...}}')
    return ToolUse(tuple(tools), "named", fn["name"], parallel)


def _response_format(fmt) -> Constraint | None:
    """``response_format``: text (None), ``json_object``, or ``json_schema`` with its schema; ``strict`` is
    what the engine's constrained decoding does anyway, so it is accepted either way."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text" and len(fmt) == 1:
        return None
    if kind == "json_object" and len(fmt) == 1:
        return Constraint("json_object", True)
    if kind == "json_schema" and set(fmt) == {"type", "json_schema"}:
        spec = fmt["json_schema"]
        if not isinstance(spec, dict) or set(spec) - {"name", "description", "schema", "strict"}:
            raise _bad("response_format.json_schema", "an object with name, schema and optionally description, strict")
        name = spec.get("name")
        if not isinstance(name, str) or not SCHEMA_NAME.fullmatch(name):
            raise _bad("response_format.json_schema.name", "1-64 characters from A-Z a-z 0-9 _ -")
        if spec.get("strict") not in (None, True, False):
            raise _bad("response_format.json_schema.strict", "must be true or false")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise _bad("response_format.json_schema.schema", "must be a JSON object (a schema)")
        # Bounded by the body's size; the validator checks the schema's own size and depth.
        return Constraint("json_schema", json.dumps(schema, ensure_ascii=False))
    raise _bad("response_format", 'must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", ...}')


def _completion(body, headers: dict[str, str]) -> tuple[RequestDraft, Shape]:
    fields, shape = _common(body, headers, "completion", ("max_tokens",))
    _check_known(body, _COMPLETION)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("prompt", "one non-empty string is required (lists of prompts and token ids are not supported)")
    suffix = body.get("suffix") or ""
    if not isinstance(suffix, str):
        raise _bad("suffix", "must be a string")
    return RequestDraft(prompt=prompt, suffix=suffix, **fields), shape


def chat_request(body, headers: dict[str, str]) -> Reading:
    """POST /v1/chat/completions, read."""
    return _read(_chat, body, headers, ("max_completion_tokens", "max_tokens"))


def completion_request(body, headers: dict[str, str]) -> Reading:
    """POST /v1/completions, read."""
    return _read(_completion, body, headers, ("max_tokens",))


# --- answers ------------------------------------------------------------------------------


class Answer:
    """Builds the OpenAI JSON of one request's answer, chunk by chunk or whole."""

    def __init__(self, shape: Shape, started: Started):
        self.chat = shape.kind == "chat"
        self.include_usage = shape.include_usage
        self.cached_tokens = 0  # of the prompt, in the prefix cache (from Done)
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + started.request_id
        self.created = int(time.time())
        self.model = shape.model
        self.object = "chat.completion" if self.chat else "text_completion"
        self._text: list[str] = []
        self._calls = Calls()

    def _chunk(self, choices: list, usage=None) -> dict:
        out = {
            "id": self.id,
            "object": self.object + (".chunk" if self.chat else ""),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            out["usage"] = usage
        return out

    def _choice(self, text: str | None, finish_reason: str | None, first: bool = False, calls=()) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            if calls:
                delta["tool_calls"] = [_call_piece(c) for c in calls]
            return {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}

    def started(self, model: str) -> dict | None:
        self.model = model
        return self._chunk([self._choice(None, None, first=True)]) if self.chat else None

    def delta(self, text: str, calls=()) -> dict:
        return self._chunk([self._choice(text, None, calls=calls)])

    def done(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> list[dict]:
        chunks = [self._chunk([self._choice(None, finish_reason)])]
        if self.include_usage:
            chunks.append(self._chunk([], usage(prompt_tokens, completion_tokens, self.cached_tokens)))
        return chunks

    # --- what the HTTP door calls (the same in every API module) ---

    def frames(self, ev) -> list[bytes]:
        """The server-sent events of one core event."""
        if isinstance(ev, Started):
            chunk = self.started(ev.model)
            return [sse(chunk)] if chunk is not None else []
        if isinstance(ev, Delta):
            return [sse(self.delta(ev.text, ev.tool_calls))] if ev.text or ev.tool_calls else []
        self.cached_tokens = ev.cached_prompt_tokens
        return [*(sse(c) for c in self.done(ev.finish_reason, ev.prompt_tokens, ev.completion_tokens)), DONE]

    def keepalive(self) -> bytes:
        """While the model is silent (a long prefill): an SSE comment, which clients skip."""
        return KEEPALIVE

    def error_frames(self, err: RpcError, names: dict[str, str]) -> list[bytes]:
        """An error after the stream started: a last event (the openai SDKs raise it)."""
        return [sse(error_body(err, names)[1])]

    def add(self, ev) -> None:
        """A whole (not streamed) answer: remember the event."""
        if isinstance(ev, Started):
            self.model = ev.model
        elif isinstance(ev, Delta):
            self._text.append(ev.text)
            self._calls.add(ev.tool_calls)

    def result(self, ev: Done) -> dict:
        """A whole answer's body, at its end."""
        self.cached_tokens = ev.cached_prompt_tokens
        return self.whole("".join(self._text), ev.finish_reason, ev.prompt_tokens, ev.completion_tokens, self._calls)

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int, calls=None) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": text}
            if calls:
                message["tool_calls"] = calls.whole()
                message["content"] = text or None  # OpenAI's: no text beside the calls is null
            choice = {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens, self.cached_tokens),
        }


DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


def sse(data: dict) -> bytes:
    """One server-sent event of OpenAI's streams: ``data:`` and JSON."""
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def _call_piece(c) -> dict:
    """A tool call's piece in OpenAI's streaming shape: id, type and name in the call's first piece."""
    out: dict = {"index": c.index}
    fn: dict = {}
    if c.id or c.name:
        out.update(id=c.id, type="function")
        fn["name"] = c.name
    fn["arguments"] = c.arguments
    out["function"] = fn
    return out


class Calls:
    """The tool calls of an answer, joined from their pieces (a non-streamed answer's ``tool_calls``)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []  # [id, name, arguments]

    def __bool__(self) -> bool:
        return bool(self.calls)

    def add(self, pieces) -> None:
        join_calls(self.calls, pieces)

    def whole(self) -> list[dict]:
        return calls_json(self.calls)


def calls_json(calls) -> list[dict]:
    """Tool calls (``[id, name, arguments]``) in OpenAI's shape (a message's ``tool_calls``)."""
    return [{"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in calls]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        # Of prompt_tokens, those the engine found in its prefix cache (vLLM's count).
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def error_body(err: RpcError, names: dict[str, str] = NAMES) -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) for an error of the request core, naming the client's fields."""
    err = err.renamed(names)
    status = http_status(err.code)
    kind = ERROR_TYPES.get(status, "server_error")
    code = err.reason or err.code.name.lower()
    return status, {"error": {"message": err.message, "type": kind, "param": err.field or None, "code": code}}


def models_list(models: list[str]) -> dict:
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": 0, "owned_by": "inference-gateway"} for m in models],
    }
