"""The one validator: a door's ``RequestDraft`` checked against ``gateway.limits``, into a ``ValidRequest``.

Every door's request passes here once, so every limit holds the same on every door. A bad request
raises ``RpcError(INVALID_ARGUMENT)`` whose message and BadRequest detail name the field in the core's
names (``messages[2].role``, ``sampling.max_tokens``); a door renames them to its own.

Sizes are checked before any work whose cost grows with them, and nothing a client sent is echoed into
a message except short, clipped excerpts.
"""

from __future__ import annotations

import json
import math
import re
import uuid

from google.protobuf import json_format, struct_pb2

from gateway.errors import clip, invalid_argument
from gateway.request import (
    MAX_SESSION_ID_CHARS,
    TOOL_CHOICES,
    Constraint,
    RequestDraft,
    ToolUse,
    ValidRequest,
    estimate_prompt_tokens,
    message_bytes,
    tools_bytes,
)
from gateway.vocabulary import PRIORITIES
from igw_common import pacing
from igw_common.config import Limits
from igw_worker_api.v1 import worker_pb2 as wpb

ROLES = ("system", "user", "assistant", "tool")
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOOL_NAME_RULE = "use 1-64 characters from A-Z a-z 0-9 _ -"
# Call ids are made by models' servers (ours: call_ and 24 letters and digits; others differ): printable.
TOOL_CALL_ID = re.compile(r"[!-~]{1,128}")
AFFINITY_ID = re.compile(r"[!-~]{1,256}")
# fullmatch: no trailing newline slips through as `$` would let it.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
REQUEST_ID_RULE = "use 1-128 characters from A-Z a-z 0-9 . _ : -"
MODEL_NAME = re.compile(r"[A-Za-z0-9._:/@+-]{1,128}")
MODEL_NAME_RULE = "use 1-128 characters from A-Z a-z 0-9 . _ : / @ + - (the model list names them)"
SUPERSEDE_KEY = re.compile(r"[A-Za-z0-9._:/@-]{1,128}")
CONTEXT_PREFIX = "Context from the caller, as JSON:\n"


def validate(draft: RequestDraft, limits: Limits) -> ValidRequest:
    """Check ``draft`` against the limits, before any work whose cost grows with its size."""
    if draft.request_id and not REQUEST_ID.fullmatch(draft.request_id):
        raise invalid_argument("request_id", REQUEST_ID_RULE)
    if draft.model and not MODEL_NAME.fullmatch(draft.model):
        raise invalid_argument("model", f"not a model name: {MODEL_NAME_RULE}")
    check_supersede_key(draft.supersede_key, "supersede_key")
    check_session_id(draft.session_id, "session_id")
    if draft.session_follows >= 0 and not draft.session_id:
        raise invalid_argument("session_follows", "continuing a session's turn needs the session's id")
    if draft.affinity_id and not AFFINITY_ID.fullmatch(draft.affinity_id):
        raise invalid_argument("affinity_id", "an agent's session id is 1-256 printable ASCII characters, no spaces")
    if draft.priority not in (None, *PRIORITIES):
        raise invalid_argument("priority", f"must be one of {', '.join(PRIORITIES)}")
    if draft.stream_interval_ms is not None:
        check_stream_interval(draft.stream_interval_ms, "stream_interval_ms")
    messages, context_messages = _prompt(draft, limits)
    tools = tool_use(draft.tools, limits) if draft.tools is not None else None
    if tools is not None and draft.constraint is not None:
        raise invalid_argument("tools", "a request has tools or a structured-output constraint, not both")
    return ValidRequest(
        request_id=draft.request_id or uuid.uuid4().hex,
        model=draft.model,
        messages=messages if draft.prompt is None else (),
        sampling=_sampling(draft, limits),
        max_tokens_was_set=draft.max_tokens is not None,
        session_id=draft.session_id,
        session_follows=max(-1, draft.session_follows),
        session_store=draft.session_store,
        affinity_id=draft.affinity_id,
        priority=draft.priority,
        estimated_prompt_tokens=estimate_prompt_tokens(messages, tools_bytes(tools)),
        supersede_key=draft.supersede_key,
        prompt=draft.prompt or "",
        suffix=draft.suffix,
        cache_bypass=draft.cache_bypass,
        context_messages=context_messages,
        stream_interval_ms=draft.stream_interval_ms,
        constraint=constraint(draft.constraint, limits) if draft.constraint is not None else None,
        tools=tools,
    )


def tool_use(t: ToolUse, limits: Limits) -> ToolUse | None:
    """The tools within the limits, each schema checked as a constraint's and made compact; None when the
    list is empty (as if none were sent: OpenAI's clients send ``tools: []``)."""
    if len(t.tools) > limits.max_tools:
        raise invalid_argument("tools", f"{len(t.tools)} tools is over the limit of {limits.max_tools}")
    size = tools_bytes(t)  # summed before any schema is parsed
    if size > limits.max_tools_bytes:
        raise invalid_argument("tools", f"{size} bytes of tools is over the limit of {limits.max_tools_bytes}")
    names: set[str] = set()
    checked = []
    for i, tool in enumerate(t.tools):
        if not TOOL_NAME.fullmatch(tool.name):
            raise invalid_argument(f"tools[{i}].name", f"not a function name: {TOOL_NAME_RULE}")
        if tool.name in names:
            raise invalid_argument(f"tools[{i}].name", f"{tool.name!r} is already the name of an earlier tool")
        names.add(tool.name)
        schema = tool.parameters_json_schema or '{"type":"object","properties":{}}'
        schema = _schema(schema, limits, f"tools[{i}].parameters_json_schema")
        checked.append(wpb.Tool(name=tool.name, description=tool.description, parameters_json_schema=schema))
    if t.choice not in TOOL_CHOICES:
        raise invalid_argument("tool_choice", "must be one of auto, none, required or a function's name")
    if t.choice == "named" and t.name not in names:
        raise invalid_argument("tool_choice", f"names {clip(t.name, 64)!r}, which is not one of the request's tools")
    if not checked:
        if t.choice in ("required", "named"):
            raise invalid_argument("tool_choice", f"{t.choice!r} needs tools; the request has none")
        return None
    return ToolUse(tuple(checked), t.choice, t.name, t.parallel)


def constraint(c: Constraint, limits: Limits) -> wpb.Constraint:
    """A structured-output constraint within the limits, as the worker takes it. Whether the engine can
    compile it is the engine's to say (its backend decides which keywords and regex features it has)."""
    field = f"constraint.{c.kind}"
    if c.kind == "json_schema":
        return wpb.Constraint(json_schema=_schema(c.value, limits, field))
    if c.kind == "json_object":
        if c.value is not True:
            raise invalid_argument(field, "must be true (leave the constraint out for free text)")
        return wpb.Constraint(json_object=True)
    if c.kind == "regex":
        if not c.value or len(c.value) > limits.max_regex_chars:
            raise invalid_argument(field, f"must be 1-{limits.max_regex_chars} characters long")
        return wpb.Constraint(regex=c.value)
    if c.kind == "choice":
        if not 1 <= len(c.value) <= limits.max_choices:
            raise invalid_argument(field, f"give 1-{limits.max_choices} choices, got {len(c.value)}")
        for i, choice in enumerate(c.value):
            if not choice or len(choice) > limits.max_choice_chars:
                raise invalid_argument(f"{field}[{i}]", f"must be 1-{limits.max_choice_chars} characters long")
        return wpb.Constraint(choice=wpb.Choices(choices=c.value))
    raise invalid_argument("constraint", f"unknown kind {clip(str(c.kind), 20)!r}")


def _schema(text: str, limits: Limits, field: str) -> str:
    """A JSON schema's text: sized before it is parsed, parsed without NaN or Infinity, an object, no deeper
    than the limit; returned as compact JSON (the key order kept: it is the order the engine writes)."""
    if len(text.encode()) > limits.max_schema_bytes:
        raise invalid_argument(field, f"{len(text.encode())} bytes is over the limit of {limits.max_schema_bytes}")
    try:
        schema = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:
        raise invalid_argument(field, f"not valid JSON ({clip(str(err), 80)})") from None
    if not isinstance(schema, dict):
        raise invalid_argument(field, "must be a JSON object (a schema)")
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limits.max_schema_depth:
            raise invalid_argument(field, f"nested deeper than {limits.max_schema_depth} levels")
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _prompt(draft: RequestDraft, limits: Limits) -> tuple[tuple[wpb.ChatMessage, ...], int]:
    """The prompt as the worker's messages (a raw prompt as one, for the size checks), and how many
    leading ones came from ``context``."""
    if draft.prompt is not None:
        if not draft.prompt:
            raise invalid_argument("prompt", "one non-empty string is required")
        for name, text in (("prompt", draft.prompt), ("suffix", draft.suffix)):
            if len(text) > limits.max_task_chars:
                raise invalid_argument(name, f"{len(text)} characters is over the limit of {limits.max_task_chars}")
        as_messages = (wpb.ChatMessage(role="user", content=draft.prompt + draft.suffix),)
        check_prompt_bytes(as_messages, limits, "prompt")
        return as_messages, 0
    if len(draft.task) > limits.max_task_chars:
        raise invalid_argument("task", f"{len(draft.task)} characters is over the limit of {limits.max_task_chars}")
    if not draft.task.strip() and not draft.messages:
        raise invalid_argument("task", "give a task, or chat messages, or both; both are empty")
    if len(draft.messages) > limits.max_messages:
        raise invalid_argument("messages", f"{len(draft.messages)} messages is over the limit of {limits.max_messages}")
    for i, m in enumerate(draft.messages):
        if m.role not in ROLES:
            raise invalid_argument(f"messages[{i}].role", f"role {clip(m.role, 20)!r} is not one of {', '.join(ROLES)}")
        if len(m.content) > limits.max_message_chars:
            raise invalid_argument(
                f"messages[{i}].content", f"{len(m.content)} characters is over the limit of {limits.max_message_chars}"
            )
        _tool_turn(m, i, limits)
    messages: list[wpb.ChatMessage] = []
    if draft.context is not None and draft.context.fields:
        messages.append(wpb.ChatMessage(role="system", content=CONTEXT_PREFIX + context_json(draft.context, limits)))
    context_messages = len(messages)
    messages.extend(draft.messages)
    if draft.task.strip():
        messages.append(wpb.ChatMessage(role="user", content=draft.task))
    check_prompt_bytes(messages, limits, "messages")
    return tuple(messages), context_messages


def _sampling(d: RequestDraft, limits: Limits) -> wpb.Sampling:
    out = wpb.Sampling()
    if d.max_tokens is not None:
        if d.max_tokens <= 0:
            raise invalid_argument("sampling.max_tokens", f"must be > 0, got {d.max_tokens}")
        if d.max_tokens > limits.max_tokens_limit and not d.max_tokens_ceiling:
            raise invalid_argument(
                "sampling.max_tokens", f"{d.max_tokens} is over this gateway's limit of {limits.max_tokens_limit}"
            )
        out.max_tokens = min(d.max_tokens, limits.max_tokens_limit)
        out.fit_context = d.max_tokens_ceiling
    else:
        out.max_tokens = limits.default_max_tokens
    if d.temperature is not None:
        if not (math.isfinite(d.temperature) and 0.0 <= d.temperature <= 2.0):
            raise invalid_argument("sampling.temperature", f"must be between 0 and 2, got {d.temperature}")
        out.temperature = d.temperature
    if d.top_p is not None:
        if not (math.isfinite(d.top_p) and 0.0 < d.top_p <= 1.0):
            raise invalid_argument("sampling.top_p", f"must be in (0, 1], got {d.top_p}")
        out.top_p = d.top_p
    if len(d.stop) > limits.max_stop_sequences:
        raise invalid_argument(
            "sampling.stop", f"{len(d.stop)} stop strings is over the limit of {limits.max_stop_sequences}"
        )
    for i, stop in enumerate(d.stop):
        if not stop or len(stop) > limits.max_stop_chars:
            raise invalid_argument(f"sampling.stop[{i}]", f"must be 1-{limits.max_stop_chars} characters long")
    out.stop.extend(d.stop)
    if d.seed is not None:
        if not -(2**63) <= d.seed < 2**63:
            raise invalid_argument("sampling.seed", "must be a 64-bit integer")
        out.seed = d.seed
    return out


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


def check_session_id(session_id: str, field: str) -> None:
    if len(session_id) > MAX_SESSION_ID_CHARS:
        raise invalid_argument(field, f"{len(session_id)} characters is over the limit of {MAX_SESSION_ID_CHARS}")
    # A header's bytes that are not UTF-8 arrive as lone surrogates, which no store key can hold.
    if not session_id.isprintable():
        raise invalid_argument(field, "printable UTF-8 characters only (no control characters or undecodable bytes)")


def check_supersede_key(key: str, field: str) -> None:
    if key and not SUPERSEDE_KEY.fullmatch(key):
        raise invalid_argument(field, "use 1-128 characters from A-Z a-z 0-9 . _ : / @ -")


def _tool_turn(m: wpb.ChatMessage, i: int, limits: Limits) -> None:
    """An assistant turn's tool calls and a tool turn's call id, within the limits."""
    if m.tool_calls and m.role != "assistant":
        raise invalid_argument(f"messages[{i}].tool_calls", "only an assistant message has tool calls")
    if len(m.tool_calls) > limits.max_tool_calls_per_message:
        raise invalid_argument(
            f"messages[{i}].tool_calls",
            f"{len(m.tool_calls)} calls is over the limit of {limits.max_tool_calls_per_message}",
        )
    for j, call in enumerate(m.tool_calls):
        field = f"messages[{i}].tool_calls[{j}]"
        if not TOOL_CALL_ID.fullmatch(call.id):
            raise invalid_argument(f"{field}.id", "must be 1-128 printable ASCII characters, no spaces")
        if not TOOL_NAME.fullmatch(call.name):
            raise invalid_argument(f"{field}.name", f"not a function name: {TOOL_NAME_RULE}")
        if len(call.arguments_json.encode()) > limits.max_tool_arguments_bytes:
            raise invalid_argument(
                f"{field}.arguments_json",
                f"{len(call.arguments_json.encode())} bytes is over the limit of {limits.max_tool_arguments_bytes}",
            )
    if m.role == "tool" and not TOOL_CALL_ID.fullmatch(m.tool_call_id):
        raise invalid_argument(
            f"messages[{i}].tool_call_id", "a tool message names its call: 1-128 printable ASCII characters, no spaces"
        )
    if m.role != "tool" and m.tool_call_id:
        raise invalid_argument(f"messages[{i}].tool_call_id", "only a tool message has a tool_call_id")


def check_prompt_bytes(messages: list[wpb.ChatMessage], limits: Limits, field: str) -> None:
    size = sum(message_bytes(m) for m in messages)
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
