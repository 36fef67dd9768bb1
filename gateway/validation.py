"""Checks an ExecuteRequest and turns it into what a worker runs.

Every limit comes from ``gateway.limits`` in the config. A bad request raises
``RpcError(INVALID_ARGUMENT)`` whose message and BadRequest detail name the
field (``messages[2].role``, ``sampling.max_tokens``, ...).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass

import grpc
from google.protobuf import json_format

from gateway.config import Limits
from gateway.errors import RpcError, invalid_argument
from gateway.v1 import gateway_pb2 as gpb
from inference.v1 import worker_pb2 as wpb

ROLES = ("system", "user", "assistant")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass
class ValidRequest:
    request_id: str
    model: str  # as asked; "" = the default model
    messages: list[wpb.ChatMessage]
    sampling: wpb.Sampling
    max_tokens_was_set: bool


def validate(req: gpb.ExecuteRequest, limits: Limits) -> ValidRequest:
    request_id = req.request_id
    if request_id:
        if not _REQUEST_ID.match(request_id):
            raise invalid_argument("request_id", "use 1-128 characters from A-Z a-z 0-9 . _ : -")
    else:
        request_id = uuid.uuid4().hex

    if len(req.session_id) > 128:
        raise invalid_argument("session_id", f"{len(req.session_id)} characters is over the limit of 128")
    if len(req.task) > limits.max_task_chars:
        raise invalid_argument("task", f"{len(req.task)} characters is over the limit of {limits.max_task_chars}")
    if not req.task.strip() and not req.messages:
        raise invalid_argument("task", "give a task, or chat messages, or both; both are empty")

    if len(req.messages) > limits.max_messages:
        raise invalid_argument("messages", f"{len(req.messages)} messages is over the limit of {limits.max_messages}")
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise invalid_argument(f"messages[{i}].role", f"role {m.role!r} is not one of {', '.join(ROLES)}")
        if len(m.content) > limits.max_message_chars:
            raise invalid_argument(
                f"messages[{i}].content",
                f"{len(m.content)} characters is over the limit of {limits.max_message_chars}",
            )

    messages: list[wpb.ChatMessage] = []
    if req.HasField("context") and req.context.fields:
        ctx = json.dumps(json_format.MessageToDict(req.context), separators=(",", ":"), ensure_ascii=False)
        size = len(ctx.encode())
        if size > limits.max_context_bytes:
            raise invalid_argument("context", f"{size} bytes as JSON is over the limit of {limits.max_context_bytes}")
        messages.append(wpb.ChatMessage(role="system", content="Context from the caller, as JSON:\n" + ctx))
    messages.extend(wpb.ChatMessage(role=m.role, content=m.content) for m in req.messages)
    if req.task.strip():
        messages.append(wpb.ChatMessage(role="user", content=req.task))

    return ValidRequest(
        request_id=request_id,
        model=req.model,
        messages=messages,
        sampling=_sampling(req.sampling, limits),
        max_tokens_was_set=req.sampling.HasField("max_tokens"),
    )


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
        raise invalid_argument("sampling.stop", f"{len(s.stop)} stop strings is over the limit of {limits.max_stop_sequences}")
    for i, stop in enumerate(s.stop):
        if not stop or len(stop) > limits.max_stop_chars:
            raise invalid_argument(f"sampling.stop[{i}]", f"must be 1-{limits.max_stop_chars} characters long")
    out.stop.extend(s.stop)
    if s.HasField("seed"):
        out.seed = s.seed
    return out


def check_fits_model(v: ValidRequest, model: str, max_context_tokens: int, limits: Limits) -> None:
    """max_tokens alone must leave room for a prompt in the model's window."""
    if v.sampling.max_tokens >= max_context_tokens:
        field = "sampling.max_tokens" if v.max_tokens_was_set else "gateway.limits.default_max_tokens (config)"
        raise invalid_argument(
            "sampling.max_tokens",
            f"{v.sampling.max_tokens} tokens leaves no room for the prompt in model {model}'s "
            f"{max_context_tokens}-token context (from {field}); ask for fewer",
        )


_PRIORITY = {gpb.PRIORITY_UNSPECIFIED: None, gpb.PRIORITY_INTERACTIVE: "interactive", gpb.PRIORITY_BATCH: "batch"}


def priority(req: gpb.ExecuteRequest, cap: str) -> str:
    """The scheduling class: the one asked for, or the key's cap when unset."""
    if req.priority not in _PRIORITY:
        raise invalid_argument("priority", f"unknown priority value {req.priority}")
    asked = _PRIORITY[req.priority]
    if asked is None:
        return cap
    if asked == "interactive" and cap == "batch":
        raise RpcError(grpc.StatusCode.PERMISSION_DENIED,
                       "priority: this API key may only send batch requests (its priority_max is batch)")
    return asked
