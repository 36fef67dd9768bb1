"""Checks an ExecuteRequest and turns it into what a worker runs.

Every limit comes from ``gateway.limits`` in the config. A bad request raises
``RpcError(INVALID_ARGUMENT)`` whose message and BadRequest detail name the
field (``messages[2].role``, ``sampling.max_tokens``, ...).

Sizes are checked before any work whose cost grows with them, and nothing a
client sent is echoed into a message except short, clipped excerpts.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass

from google.protobuf import json_format, struct_pb2

from gateway.errors import RpcError, clip, invalid_argument
from gateway.v1 import gateway_pb2 as gpb
from gateway.vocabulary import PRIORITY_FROM_WIRE
from igw_common import pacing
from igw_common.config import Limits
from inference.v1 import worker_pb2 as wpb

ROLES = ("system", "user", "assistant")
# fullmatch: no trailing newline slips through as `$` would let it.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MODEL_NAME = re.compile(r"[A-Za-z0-9._:/@+-]{1,128}")
MAX_SESSION_ID_CHARS = 128
SUPERSEDE_KEY = re.compile(r"[A-Za-z0-9._:/@-]{1,128}")
CONTEXT_PREFIX = "Context from the caller, as JSON:\n"


@dataclass
class ValidRequest:
    request_id: str  # the client's label (or one we made): logs and `started` only, never a key
    model: str  # as asked; "" = the default model
    messages: list[wpb.ChatMessage]
    sampling: wpb.Sampling
    max_tokens_was_set: bool
    session_id: str = ""
    priority: str | None = None  # as asked; None = the key's cap
    estimated_prompt_tokens: int = 0  # the scheduler's cost until the worker has tokenized the prompt
    supersede_key: str = ""  # a newer request with this key (same tenant) cancels this one
    prompt: str = ""  # a raw prompt (no chat template) instead of messages: text completions
    suffix: str = ""  # fill-in-the-middle: the text after the cursor (prompt is the text before)
    cache_bypass: bool = False  # neither answered from nor stored in the response cache
    context_messages: int = 0  # leading messages made from `context` (per request: never stored in a session)
    stream_interval_ms: int | None = None  # merge steps into a delta at most this often; None = the default


def validate(req: gpb.ExecuteRequest, limits: Limits) -> ValidRequest:
    request_id = req.request_id
    if request_id:
        if not REQUEST_ID.fullmatch(request_id):
            raise invalid_argument("request_id", "use 1-128 characters from A-Z a-z 0-9 . _ : -")
    else:
        request_id = uuid.uuid4().hex
    if req.model and not MODEL_NAME.fullmatch(req.model):
        raise invalid_argument(
            "model",
            "not a model name: use 1-128 characters from A-Z a-z 0-9 . _ : / @ + - (ListModels lists the names)",
        )
    check_supersede_key(req.supersede_key, "supersede_key")
    if len(req.session_id) > MAX_SESSION_ID_CHARS:
        raise invalid_argument(
            "session_id", f"{len(req.session_id)} characters is over the limit of {MAX_SESSION_ID_CHARS}"
        )
    if len(req.task) > limits.max_task_chars:
        raise invalid_argument("task", f"{len(req.task)} characters is over the limit of {limits.max_task_chars}")
    if not req.task.strip() and not req.messages:
        raise invalid_argument("task", "give a task, or chat messages, or both; both are empty")
    if len(req.messages) > limits.max_messages:
        raise invalid_argument("messages", f"{len(req.messages)} messages is over the limit of {limits.max_messages}")
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise invalid_argument(f"messages[{i}].role", f"role {clip(m.role, 20)!r} is not one of {', '.join(ROLES)}")
        if len(m.content) > limits.max_message_chars:
            raise invalid_argument(
                f"messages[{i}].content",
                f"{len(m.content)} characters is over the limit of {limits.max_message_chars}",
            )

    messages: list[wpb.ChatMessage] = []
    if req.HasField("context") and req.context.fields:
        messages.append(wpb.ChatMessage(role="system", content=CONTEXT_PREFIX + context_json(req.context, limits)))
    context_messages = len(messages)
    messages.extend(wpb.ChatMessage(role=m.role, content=m.content) for m in req.messages)
    if req.task.strip():
        messages.append(wpb.ChatMessage(role="user", content=req.task))
    check_prompt_bytes(messages, limits, "messages")

    if req.priority not in PRIORITY_FROM_WIRE:
        raise invalid_argument("priority", f"unknown priority value {req.priority}")
    return ValidRequest(
        request_id=request_id,
        model=req.model,
        messages=messages,
        sampling=_sampling(req.sampling, limits),
        max_tokens_was_set=req.sampling.HasField("max_tokens"),
        session_id=req.session_id,
        priority=PRIORITY_FROM_WIRE[req.priority],
        estimated_prompt_tokens=estimate_prompt_tokens(messages),
        supersede_key=req.supersede_key,
        cache_bypass=req.cache_bypass,
        context_messages=context_messages,
        stream_interval_ms=check_stream_interval(req.stream_interval_ms, "stream_interval_ms")
        if req.HasField("stream_interval_ms")
        else None,
    )


MAX_STREAM_INTERVAL_MS = pacing.MAX_STREAM_INTERVAL_MS


def header_number(raw: str, field: str, low: int, high: int) -> int:
    """A whole number from an HTTP header: ASCII digits only (str.isdigit also takes "²", which int()
    refuses) and at most 10 of them (int() refuses over 4,300), so a hostile value is a 400, not a 500."""
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 10) or not low <= int(raw) <= high:
        raise invalid_argument(field, f"a whole number of milliseconds, {low}-{high}")
    return int(raw)


def check_stream_interval(value: int, field: str) -> int:
    if not 0 <= value <= MAX_STREAM_INTERVAL_MS:
        raise invalid_argument(field, f"must be 0-{MAX_STREAM_INTERVAL_MS} ms, got {value}")
    return value


def check_supersede_key(key: str, field: str) -> None:
    if key and not SUPERSEDE_KEY.fullmatch(key):
        raise invalid_argument(field, "use 1-128 characters from A-Z a-z 0-9 . _ : / @ -")


def check_prompt_bytes(messages: list[wpb.ChatMessage], limits: Limits, field: str) -> None:
    size = sum(len(m.content.encode()) for m in messages)
    if size > limits.max_prompt_bytes:
        raise invalid_argument(
            field, f"the prompt is {size} bytes of text in all, over the limit of {limits.max_prompt_bytes}"
        )


def context_json(ctx: struct_pb2.Struct, limits: Limits, field: str = "context") -> str:
    """The context as compact JSON, after checking depth, numbers and size on the message itself
    (an oversized or deeply nested context costs no conversion)."""
    # Walk without recursion, adding a lower bound of each node's JSON size; stop at the first excess.
    # Depth counts objects and lists: {"a": [1]} is 2 levels.
    budget, max_depth = limits.max_context_bytes, limits.max_context_depth
    size = 2
    stack: list[tuple[object, int, str]] = [(ctx, 1, field)]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, struct_pb2.Struct):
            items = ((key, value) for key, value in node.fields.items())
        else:
            items = ((i, value) for i, value in enumerate(node.values))
        for key, value in items:
            size += len(key) + 4 if isinstance(key, str) else 1
            where = f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]"
            kind = value.WhichOneof("kind")
            if kind in ("struct_value", "list_value"):
                if depth + 1 > max_depth:
                    raise invalid_argument(field, f"nested deeper than {max_depth} levels (at {clip(where)})")
                stack.append((getattr(value, kind), depth + 1, where))
            elif kind == "string_value":
                size += len(value.string_value) + 2
            elif kind == "number_value":
                if not math.isfinite(value.number_value):
                    raise invalid_argument(field, f"{clip(where)} is {value.number_value}, which JSON cannot carry")
                size += 1
            else:  # null, bool
                size += 4
            if size > budget:
                raise invalid_argument(field, f"more than {budget} bytes as JSON, over the limit of {budget}")
    text = json.dumps(json_format.MessageToDict(ctx), separators=(",", ":"), ensure_ascii=False)
    size = len(text.encode())
    if size > budget:
        raise invalid_argument(field, f"{size} bytes as JSON is over the limit of {budget}")
    return text


def _sampling(s: gpb.SamplingParams, limits: Limits) -> wpb.Sampling:
    out = wpb.Sampling()
    if s.HasField("max_tokens"):
        if s.max_tokens <= 0:
            raise invalid_argument("sampling.max_tokens", f"must be > 0, got {s.max_tokens}")
        if s.max_tokens > limits.max_tokens_limit:
            raise invalid_argument(
                "sampling.max_tokens", f"{s.max_tokens} is over this gateway's limit of {limits.max_tokens_limit}"
            )
        out.max_tokens = s.max_tokens
    else:
        out.max_tokens = limits.default_max_tokens
    if s.HasField("temperature"):
        if not (math.isfinite(s.temperature) and 0.0 <= s.temperature <= 2.0):
            raise invalid_argument("sampling.temperature", f"must be between 0 and 2, got {s.temperature}")
        out.temperature = s.temperature
    if s.HasField("top_p"):
        if not (math.isfinite(s.top_p) and 0.0 < s.top_p <= 1.0):
            raise invalid_argument("sampling.top_p", f"must be in (0, 1], got {s.top_p}")
        out.top_p = s.top_p
    if len(s.stop) > limits.max_stop_sequences:
        raise invalid_argument(
            "sampling.stop", f"{len(s.stop)} stop strings is over the limit of {limits.max_stop_sequences}"
        )
    for i, stop in enumerate(s.stop):
        if not stop or len(stop) > limits.max_stop_chars:
            raise invalid_argument(f"sampling.stop[{i}]", f"must be 1-{limits.max_stop_chars} characters long")
    out.stop.extend(s.stop)
    if s.HasField("seed"):
        out.seed = s.seed
    return out


def estimate_prompt_tokens(messages) -> int:
    """The scheduler's estimate of a prompt's tokens before the worker has tokenized it:
    about 3 bytes of text per token (BPE vocabularies average 3-4 bytes per token on code and
    English, ~3 on CJK) plus the chat template's own tokens. The worker's count replaces it at
    acceptance; quotas reserve an upper bound instead (``gateway.quota.prompt_token_bound``)."""
    return sum(len(m.content.encode()) // 3 + 8 for m in messages) + 16


class Undecodable:
    """A request body that protobuf could not decode; Execute answers INVALID_ARGUMENT naming ``field``."""

    def __init__(self, field: str, description: str):
        self.field, self.description = field, description

    def error(self) -> RpcError:
        return invalid_argument(self.field, self.description)
