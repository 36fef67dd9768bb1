"""The OpenAI wire format: request bodies into ``ValidRequest``s, events into OpenAI JSON, errors into statuses.

Only what the HTTP front door (``gateway.http_api``) needs to speak the
subset of the OpenAI API that IDE assistants and SDKs use:
``/v1/chat/completions``, ``/v1/completions`` (with ``suffix`` for
fill-in-the-middle) and ``/v1/models``. Every limit is the gateway's own
(``gateway.limits``), checked by the same functions as for ``Execute``;
errors name the OpenAI parameter (``messages[2].content``, ``max_tokens``).

A parameter the gateway does not support is refused with 400 naming it,
never silently ignored, unless it asks for exactly what the gateway does
anyway (``n: 1``, ``presence_penalty: 0``, ``logprobs: false``, ...).
"""

from __future__ import annotations

import math
import time
import uuid

import grpc

from gateway.errors import RpcError, clip, invalid_argument
from gateway.validation import (
    MAX_STREAM_INTERVAL_MS,
    MODEL_NAME,
    REQUEST_ID,
    ValidRequest,
    check_prompt_bytes,
    check_supersede_key,
    estimate_prompt_tokens,
    header_number,
)
from gateway.vocabulary import BATCH, INTERACTIVE
from igw_common.config import Limits
from inference.v1 import worker_pb2 as wpb

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
    "tools": (None,),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None,),
}
_CHAT = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "user",
    "response_format",
}
_COMPLETION = {
    "model",
    "prompt",
    "suffix",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "user",
}
# Roles: "developer" is OpenAI's newer name for "system".
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# gRPC status -> HTTP status and OpenAI error type.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
# Field names of the worker and of Execute, as the OpenAI body calls them.
_PARAM = {
    "sampling.max_tokens": "max_tokens",
    "task": "messages",
    "sampling.stop": "stop",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
}


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


def _number(body: dict, key: str, low: float, high: float, low_open: bool = False) -> float | None:
    if body.get(key) is None:
        return None
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(key, "must be a number")
    if value < low or value > high or (low_open and value <= low):
        raise _bad(key, f"must be {'>' if low_open else '>='} {low:g} and <= {high:g}, got {value:g}")
    return float(value)


def _text(value, param: str) -> str:
    """Message content: a string, or a list of text parts (what the SDKs send)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        out = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{param}[{i}]", "only text parts are supported")
            out.append(part["text"])
        return "".join(out)
    raise _bad(param, "must be a string or a list of text parts")


def _sampling(body: dict, limits: Limits, max_tokens_keys: tuple[str, ...]) -> tuple[wpb.Sampling, bool]:
    out = wpb.Sampling()
    given = [k for k in max_tokens_keys if body.get(k) is not None]
    if given:
        key, value = given[0], body[given[0]]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise _bad(key, "must be a positive integer")
        if value > limits.max_tokens_limit:
            raise _bad(key, f"{value} is over this gateway's limit of {limits.max_tokens_limit}")
        out.max_tokens = value
    else:
        out.max_tokens = limits.default_max_tokens
    if (t := _number(body, "temperature", 0.0, 2.0)) is not None:
        out.temperature = t
    if (p := _number(body, "top_p", 0.0, 1.0, low_open=True)) is not None:
        out.top_p = p
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("stop", "must be a string or a list of strings")
        if len(stops) > limits.max_stop_sequences:
            raise _bad("stop", f"{len(stops)} stop strings is over the limit of {limits.max_stop_sequences}")
        for i, s in enumerate(stops):
            if not s or len(s) > limits.max_stop_chars:
                raise _bad(f"stop[{i}]", f"must be 1-{limits.max_stop_chars} characters long")
        out.stop.extend(stops)
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63:
            raise _bad("seed", "must be a 64-bit integer")
        out.seed = seed
    return out, bool(given)


def _common(body, headers: dict[str, str], limits: Limits) -> dict:
    """What chat and text completions share: model, the igw headers, the stream options."""
    if not isinstance(body, dict):
        raise _bad("body", "the body must be a JSON object")
    model = body.get("model") or ""
    if not isinstance(model, str) or (model and not MODEL_NAME.fullmatch(model)):
        raise _bad("model", "not a model name (GET /v1/models lists them)")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _bad("stream_options", "only include_usage is supported")
    if options and not stream:
        raise _bad("stream_options", "only allowed with stream: true")
    request_id = headers.get("x-igw-request-id", "")
    if request_id and not REQUEST_ID.fullmatch(request_id):
        raise _bad("x-igw-request-id", "use 1-128 characters from A-Z a-z 0-9 . _ : -")
    priority = headers.get("x-igw-priority", "") or None
    if priority not in (None, INTERACTIVE, BATCH):
        raise _bad("x-igw-priority", f"must be {INTERACTIVE} or {BATCH}")
    session_id = headers.get("x-igw-session-id", "")
    if len(session_id) > 128:
        raise _bad("x-igw-session-id", "at most 128 characters")
    supersede_key = headers.get("x-igw-supersede-key", "")
    check_supersede_key(supersede_key, "x-igw-supersede-key")
    cache = headers.get("x-igw-cache", "")
    if cache not in ("", "bypass"):
        raise _bad("x-igw-cache", 'only "bypass" (skip the response cache) is supported')
    interval = headers.get("x-igw-stream-interval-ms")
    if interval is not None:
        interval = header_number(interval, "x-igw-stream-interval-ms", 0, MAX_STREAM_INTERVAL_MS)
    return {
        "model": model,
        "stream": stream,
        "include_usage": bool(options.get("include_usage")),
        "request_id": request_id or uuid.uuid4().hex,
        "priority": priority,
        "session_id": session_id,
        "supersede_key": supersede_key,
        "cache_bypass": cache == "bypass",
        "stream_interval_ms": interval,
    }


def chat_request(body, headers: dict[str, str], limits: Limits) -> tuple[ValidRequest, dict]:
    """POST /v1/chat/completions -> (the request to run, how to answer)."""
    common = _common(body, headers, limits)
    _check_known(body, _CHAT)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _bad("response_format", 'only {"type": "text"} is supported')
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _bad("messages", "a non-empty list of messages is required")
    if len(raw) > limits.max_messages:
        raise _bad("messages", f"{len(raw)} messages is over the limit of {limits.max_messages}")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "must be an object with role and content")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"messages[{i}].role", f"must be one of {', '.join(_ROLES)}")
        content = _text(m.get("content", ""), f"messages[{i}].content")
        if len(content) > limits.max_message_chars:
            raise _bad(
                f"messages[{i}].content", f"{len(content)} characters is over the limit of {limits.max_message_chars}"
            )
        messages.append(wpb.ChatMessage(role=_ROLES[role], content=content))
    check_prompt_bytes(messages, limits, "messages")
    sampling, max_set = _sampling(body, limits, ("max_completion_tokens", "max_tokens"))
    valid = ValidRequest(
        request_id=common["request_id"],
        model=common["model"],
        messages=messages,
        sampling=sampling,
        max_tokens_was_set=max_set,
        session_id=common["session_id"],
        priority=common["priority"],
        estimated_prompt_tokens=estimate_prompt_tokens(messages),
        supersede_key=common["supersede_key"],
        stream_interval_ms=common["stream_interval_ms"],
        cache_bypass=common["cache_bypass"],
    )
    return valid, {"kind": "chat", **common}


def completion_request(body, headers: dict[str, str], limits: Limits) -> tuple[ValidRequest, dict]:
    """POST /v1/completions -> (the request to run, how to answer)."""
    common = _common(body, headers, limits)
    _check_known(body, _COMPLETION)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("prompt", "one non-empty string is required (lists of prompts and token ids are not supported)")
    suffix = body.get("suffix") or ""
    if not isinstance(suffix, str):
        raise _bad("suffix", "must be a string")
    for name, text in (("prompt", prompt), ("suffix", suffix)):
        if len(text) > limits.max_task_chars:
            raise _bad(name, f"{len(text)} characters is over the limit of {limits.max_task_chars}")
    as_messages = [wpb.ChatMessage(role="user", content=prompt + suffix)]
    check_prompt_bytes(as_messages, limits, "prompt")
    sampling, max_set = _sampling(body, limits, ("max_tokens",))
    valid = ValidRequest(
        request_id=common["request_id"],
        model=common["model"],
        messages=[],
        sampling=sampling,
        max_tokens_was_set=max_set,
        session_id=common["session_id"],
        priority=common["priority"],
        estimated_prompt_tokens=estimate_prompt_tokens(as_messages),
        supersede_key=common["supersede_key"],
        prompt=prompt,
        suffix=suffix,
        stream_interval_ms=common["stream_interval_ms"],
        cache_bypass=common["cache_bypass"],
    )
    return valid, {"kind": "completion", **common}


# --- answers ------------------------------------------------------------------------------


class Answer:
    """Builds the OpenAI JSON of one request's answer, chunk by chunk or whole."""

    def __init__(self, how: dict):
        self.chat = how["kind"] == "chat"
        self.include_usage = how["include_usage"]
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + how["request_id"]
        self.created = int(time.time())
        self.model = how["model"]
        self.object = "chat.completion" if self.chat else "text_completion"

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

    def _choice(self, text: str | None, finish_reason: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            return {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}

    def started(self, model: str) -> dict | None:
        self.model = model
        return self._chunk([self._choice(None, None, first=True)]) if self.chat else None

    def delta(self, text: str) -> dict:
        return self._chunk([self._choice(text, None)])

    def done(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> list[dict]:
        chunks = [self._chunk([self._choice(None, finish_reason)])]
        if self.include_usage:
            chunks.append(self._chunk([], usage(prompt_tokens, completion_tokens)))
        return chunks

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
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
            "usage": usage(prompt_tokens, completion_tokens),
        }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_body(err: RpcError) -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) for an error of the request core."""
    status, kind = HTTP_STATUS.get(err.code, (500, "server_error"))
    param = _PARAM.get(err.field, err.field) or None
    message = err.message
    if param and err.field and message.startswith(err.field + ":"):
        message = f"{param}:{message[len(err.field) + 1 :]}"
    code = err.reason or err.code.name.lower()
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def models_list(models: list[str]) -> dict:
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": 0, "owned_by": "inference-gateway"} for m in models],
    }
