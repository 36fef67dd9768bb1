"""The OpenAI Responses wire format (``POST /v1/responses``, what Codex CLI speaks): bodies into the core's
``RequestDraft``, events into Responses JSON and its typed server-sent events, errors as OpenAI's.

- ``instructions`` becomes a leading system message; ``input`` is a string (one user turn) or items:
  messages (``input_text`` / ``output_text`` parts; roles user, assistant, system, developer),
  ``function_call`` items (an assistant turn's tool calls, consecutive ones joined) and
  ``function_call_output`` items (``tool`` turns); ``reasoning`` items are dropped (not sent back to a
  model that did not make them).
- ``tools`` are function tools in the Responses' flat shape (``name``, ``description``, ``parameters``);
  hosted tools (``web_search``, ``file_search``, ...) and Codex's tool namespaces are left out;
  ``tool_choice`` and ``parallel_tool_calls`` as on chat completions; ``text.format`` (json_object,
  json_schema) is the core's structured-output constraint; ``max_output_tokens`` its max_tokens.
- The stream: ``response.created``, ``response.in_progress``, per output item ``output_item.added`` ...
  ``output_text.delta`` / ``function_call_arguments.delta`` ... ``output_item.done``, then
  ``response.completed`` (or ``response.incomplete`` at ``max_output_tokens``) with usage; every event has a
  ``sequence_number``.

Stored responses are turns of the gateway's server-side sessions (``gateway.state.sessions``, bounded and
per tenant): ``store`` (default true, as OpenAI's) starts a session for a new conversation, or writes the
turn into the session of ``previous_response_id``, which is read around the new ``input``. A stored
response's id names its session and turn (``resp_`` + the session id in base64url + ``.`` + the turn's
number), so nothing maps ids to sessions; only a conversation's latest response can be continued (no
branches). ``GET /v1/responses/{id}`` reads a stored turn back as a response; ``DELETE`` deletes the
conversation it belongs to (the gateway stores conversations, not single responses). With sessions off
(``gateway.sessions.enabled``) nothing is stored and a ``previous_response_id`` is refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import uuid

import grpc

from gateway.core.events import Delta, Done, Started
from gateway.doors import openai_api
from gateway.doors.openai_api import (
    HEADER_NAMES,
    KEEPALIVE,
    Reading,
    Shape,
    error_body,
    function_tool,
    header_fields,
    json_number,
    read_with,
    text_parts,
)
from gateway.errors import RpcError, clip, field_error, invalid_argument
from gateway.request import MAX_SESSION_ID_CHARS, Constraint, RequestDraft, ToolUse
from gateway.state.sessions import Turn
from igw_common.tool_calls import CallDelta
from igw_worker_api.v1 import worker_pb2 as wpb

DOOR = "responses"
_KNOWN = {
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_p",
    "stream",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "text",
    "store",
    "metadata",
    "previous_response_id",
    "user",
    "prompt_cache_key",
    "include",
    "client_metadata",
    "reasoning",  # an effort or summary asks nothing of a model that does not reason: dropped
}
# Tools that run on OpenAI's side (and Codex's namespaces of sub-agent tools): no model served here can call
# them, so they are left out of the prompt, not refused (Codex sends web_search on every request).
HOSTED_TOOLS = {
    "web_search",
    "web_search_preview",
    "file_search",
    "code_interpreter",
    "computer_use_preview",
    "image_generation",
    "mcp",
    "local_shell",
    "namespace",
}
# Accepted when they ask for what the gateway does anyway (Codex CLI sends these).
_NEUTRAL = {
    "truncation": (None, "disabled"),
    "service_tier": (None, "auto", "default"),
    "background": (None, False),
}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

NAMES = {
    **HEADER_NAMES,
    "sampling.max_tokens": "max_output_tokens",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "task": "input",
    "constraint": "text.format",
    "constraint.json_schema": "text.format.schema",
    "tools[].parameters_json_schema": "tools[].parameters",
    "session_follows": "previous_response_id",
}
MAX_RESPONSE_ID_CHARS = 256  # a stored response's id: resp_ + base64url of a session id (128 chars) + . + turn
_TURN_NUMBER = re.compile(r"[0-9]{1,12}")
ERROR_TYPES = openai_api.ERROR_TYPES


def _bad(param: str, message: str) -> RpcError:
    return invalid_argument(param, message)


def _content(value, param: str) -> str:
    return text_parts(value, param, ("input_text", "output_text", "text"))


def _items(raw, names: dict[str, str], messages: list[wpb.ChatMessage]) -> None:
    """``input`` items appended to ``messages`` as chat turns; ``names`` maps each turn to its item."""
    if isinstance(raw, str):
        names[f"messages[{len(messages)}]"] = "input"
        messages.append(wpb.ChatMessage(role="user", content=raw))
        return
    if not isinstance(raw, list) or not raw:
        raise _bad("input", "a string or a non-empty list of items is required")
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise _bad(f"input[{i}]", "must be an item object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise _bad(f"input[{i}].role", f"must be one of {', '.join(_ROLES)}")
            names[f"messages[{len(messages)}]"] = f"input[{i}]"
            messages.append(
                wpb.ChatMessage(role=_ROLES[role], content=_content(item.get("content"), f"input[{i}].content"))
            )
        elif kind == "function_call":
            call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments", "")
            if not all(isinstance(v, str) for v in (call_id, name, arguments)):
                raise _bad(f"input[{i}]", "a function_call item has string call_id, name and arguments")
            call = wpb.ToolCall(id=call_id, name=name, arguments_json=arguments)
            if messages and messages[-1].role == "assistant" and (messages[-1].tool_calls or not messages[-1].content):
                messages[-1].tool_calls.append(call)  # one assistant turn: its text, then its calls
            else:
                names[f"messages[{len(messages)}]"] = f"input[{i}]"
                messages.append(wpb.ChatMessage(role="assistant", tool_calls=[call]))
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise _bad(f"input[{i}].call_id", "must be a string")
            names[f"messages[{len(messages)}]"] = f"input[{i}]"
            messages.append(
                wpb.ChatMessage(role="tool", content=_content(output, f"input[{i}].output"), tool_call_id=call_id)
            )
        elif kind == "reasoning":
            continue
        else:
            raise _bad(f"input[{i}].type", "only message, function_call and function_call_output items are supported")


def _tools(body: dict) -> ToolUse | None:
    raw, choice, parallel = body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls")
    if parallel not in (None, True, False):
        raise _bad("parallel_tool_calls", "must be true or false")
    if not raw and choice in (None, "auto", "none"):
        return None
    if not isinstance(raw, list):
        raise _bad("tools", "must be a list of function tools")
    tools = []
    for i, t in enumerate(raw):
        if isinstance(t, dict) and t.get("type") in HOSTED_TOOLS:
            continue
        if not isinstance(t, dict) or t.get("type") != "function":
            raise _bad(f"tools[{i}]", 'only function tools: {"type": "function", "name": ..., "parameters": ...}')
        tools.append(function_tool(t, f"tools[{i}]"))
    parallel = parallel is not False
    if choice in (None, "auto", "none", "required"):
        return ToolUse(tuple(tools), choice or "auto", "", parallel)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return ToolUse(tuple(tools), "named", choice["name"], parallel)
    raise _bad("tool_choice", '"auto", "none", "required" or {"type": "function", "name": ...}')


def _format(text) -> Constraint | None:
    """``text.format``: text, json_object, or json_schema (flat: name, schema, strict, description)."""
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"}:
        raise _bad("text", 'an object with "format"')
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object", True)
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise _bad("text.format.schema", "must be a JSON object (a schema)")
        if not isinstance(fmt.get("name"), str) or not openai_api.SCHEMA_NAME.fullmatch(fmt["name"]):
            raise _bad("text.format.name", "1-64 characters from A-Z a-z 0-9 _ -")
        return Constraint("json_schema", json.dumps(schema, ensure_ascii=False))
    raise _bad("text.format", 'type must be "text", "json_object" or "json_schema"')


def response_id(session_id: str, turn: int) -> str:
    """A stored response's id: its session and turn, so reading it back needs no index."""
    return f"resp_{base64.urlsafe_b64encode(session_id.encode()).decode().rstrip('=')}.{turn}"


def parse_response_id(rid: str) -> tuple[str, int] | None:
    """(session id, turn number) of a stored response's id; None for any other text (an unknown id)."""
    if len(rid) > MAX_RESPONSE_ID_CHARS or not rid.startswith("resp_"):
        return None
    encoded, _, number = rid[5:].rpartition(".")
    if not _TURN_NUMBER.fullmatch(number):
        return None
    try:
        session_id = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    if not 0 < len(session_id) <= MAX_SESSION_ID_CHARS or not session_id.isprintable():
        return None
    if response_id(session_id, int(number)) != rid:
        return None  # one id per turn: no second spelling of it
    return session_id, int(number)


def unknown_response(rid: str) -> RpcError:
    return RpcError(
        grpc.StatusCode.NOT_FOUND,
        f"no stored response {clip(rid)!r} for this caller (never stored, trimmed, expired, deleted or "
        "another tenant's)",
        reason="response_not_found",
    )


def _conversation(body: dict, fields: dict) -> dict:
    """The session fields of ``store`` and ``previous_response_id``."""
    store, previous = body.get("store", True), body.get("previous_response_id")
    if not isinstance(store, bool):
        raise _bad("store", "must be true or false")
    if previous is None:
        if store and not fields["session_id"]:
            fields["session_id"] = uuid.uuid4().hex  # a new conversation: its own session
        return {"session_store": store}
    if not isinstance(previous, str):
        raise _bad("previous_response_id", "must be a response id (a string)")
    found = parse_response_id(previous)
    if found is None:
        raise field_error(
            grpc.StatusCode.NOT_FOUND,
            "previous_response_id",
            f"no stored response {clip(previous)!r} (only responses made with store true can be continued)",
            "response_not_found",
        )
    if fields["session_id"] and fields["session_id"] != found[0]:
        raise _bad("previous_response_id", "names another conversation than x-igw-session-id")
    fields["session_id"] = found[0]
    return {"session_follows": found[1], "session_store": store}


def _read(body, headers: dict[str, str]) -> tuple[RequestDraft, Shape, dict[str, str]]:
    if not isinstance(body, dict):
        raise _bad("body", "the body must be a JSON object")
    for key, value in body.items():
        if key not in _KNOWN and not any(value == v for v in _NEUTRAL.get(key, ())):
            raise _bad(clip(str(key), 40), "this gateway does not support this parameter (or this value of it)")
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise _bad("model", "not a model name (GET /v1/models lists them)")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "must be true or false")
    max_tokens = body.get("max_output_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
        raise _bad("max_output_tokens", "must be a positive integer")
    messages: list[wpb.ChatMessage] = []
    names = dict(NAMES)
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("instructions", "must be a string")
        names["messages[0]"] = "instructions"
        messages.append(wpb.ChatMessage(role="system", content=instructions))
    _items(body.get("input"), names, messages)
    fields = header_fields(headers, body.get("prompt_cache_key"))
    session = _conversation(body, fields)
    draft = RequestDraft(
        model=model,
        messages=tuple(messages),
        # Unset: as much as the model allows (OpenAI's meaning), i.e. a ceiling at the gateway's limit.
        max_tokens=max_tokens if max_tokens is not None else 2**31 - 1,
        max_tokens_ceiling=max_tokens is None,
        temperature=json_number(body, "temperature"),
        top_p=json_number(body, "top_p"),
        tools=_tools(body),
        constraint=_format(body.get("text")),
        **fields,
        **session,
    )
    return draft, Shape("responses", model, stream, True, draft.session_id), names


def responses_request(body, headers: dict[str, str]) -> Reading:
    """POST /v1/responses, read."""
    return read_with(_read, body, headers, NAMES)


class Answer:
    """Builds one request's Response: output items (a message with output_text, function calls)."""

    def __init__(self, shape: Shape, started: Started):
        # Stored: the id names the session turn it will be; else the request's own id.
        stored = started.session_turn >= 0 and shape.session_id
        self.id = response_id(shape.session_id, started.session_turn) if stored else "resp_" + started.request_id
        self.model = shape.model
        self.created_at = int(time.time())
        self.items: list[dict] = []
        self.open: dict | None = None  # streams: the item being written
        self.seq = 0

    def response(self, status: str, usage: dict | None = None, reason: str | None = None) -> dict:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": self.items,
            "usage": usage,
            "incomplete_details": {"reason": reason} if reason else None,
            "error": None,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
        }

    def _event(self, kind: str, **data) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return f"event: {kind}\ndata: ".encode() + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"

    # --- streams ---

    def frames(self, ev) -> list[bytes]:
        if isinstance(ev, Started):
            self.model = ev.model
            created = self.response("in_progress")
            return [
                self._event("response.created", response=created),
                self._event("response.in_progress", response=created),
            ]
        if isinstance(ev, Delta):
            out = []
            if ev.text:
                if self.open is None or self.open["type"] != "message":
                    out += self._open(
                        {
                            "type": "message",
                            "id": f"msg_{self.id[5:]}_{len(self.items)}",
                            "status": "in_progress",
                            "role": "assistant",
                            "content": [],
                        }
                    )
                    part = {"type": "output_text", "text": "", "annotations": []}
                    out.append(
                        self._event(
                            "response.content_part.added",
                            item_id=self.open["id"],
                            output_index=len(self.items) - 1,
                            content_index=0,
                            part=part,
                        )
                    )
                    self.open["content"].append(part)
                self.open["content"][0]["text"] += ev.text
                out.append(
                    self._event(
                        "response.output_text.delta",
                        item_id=self.open["id"],
                        output_index=len(self.items) - 1,
                        content_index=0,
                        delta=ev.text,
                    )
                )
            for c in ev.tool_calls:
                if c.id or c.name:
                    out += self._open(
                        {
                            "type": "function_call",
                            "id": f"fc_{c.id}",
                            "call_id": c.id,
                            "name": c.name,
                            "arguments": "",
                            "status": "in_progress",
                        }
                    )
                if c.arguments and self.open is not None and self.open["type"] == "function_call":
                    self.open["arguments"] += c.arguments
                    out.append(
                        self._event(
                            "response.function_call_arguments.delta",
                            item_id=self.open["id"],
                            output_index=len(self.items) - 1,
                            delta=c.arguments,
                        )
                    )
            return out
        out = self._close()
        usage, reason = _usage(ev), "max_output_tokens" if ev.finish_reason == "length" else None
        status = "incomplete" if reason else "completed"
        out.append(self._event(f"response.{status}", response=self.response(status, usage, reason)))
        return out

    def _open(self, item: dict) -> list[bytes]:
        out = self._close()
        self.open = item
        self.items.append(item)
        return [
            *out,
            self._event(
                "response.output_item.added",
                output_index=len(self.items) - 1,
                item={**item, "content": []} if item["type"] == "message" else dict(item),
            ),
        ]

    def _close(self) -> list[bytes]:
        item, self.open = self.open, None
        if item is None:
            return []
        index = len(self.items) - 1
        item["status"] = "completed"
        out = []
        if item["type"] == "message":
            part = item["content"][0]
            out.append(
                self._event(
                    "response.output_text.done",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    text=part["text"],
                )
            )
            out.append(
                self._event(
                    "response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part
                )
            )
        else:
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    arguments=item["arguments"],
                )
            )
        out.append(self._event("response.output_item.done", output_index=index, item=item))
        return out

    def keepalive(self) -> bytes:
        """While the model is silent (a long prefill): an SSE comment, which clients skip."""
        return KEEPALIVE

    def error_frames(self, err: RpcError, names: dict[str, str]) -> list[bytes]:
        status, body = error_body(err, names)
        e = body["error"]
        return [self._event("error", code=e["code"], message=e["message"], param=e["param"])]

    # --- whole answers ---

    def add(self, ev) -> None:
        if isinstance(ev, Started):
            self.model = ev.model
        elif isinstance(ev, Delta):
            self.frames(ev)  # the same items, without sending their events

    def result(self, ev: Done) -> dict:
        self._close()
        reason = "max_output_tokens" if ev.finish_reason == "length" else None
        return self.response("incomplete" if reason else "completed", _usage(ev), reason)


def _usage(ev: Done) -> dict:
    return {
        "input_tokens": ev.prompt_tokens,
        "input_tokens_details": {"cached_tokens": ev.cached_prompt_tokens},
        "output_tokens": ev.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": ev.prompt_tokens + ev.completion_tokens,
    }


def stored_response(rid: str, turn: Turn) -> dict:
    """A stored turn read back as the response it was (GET /v1/responses/{id}): its events replayed into
    an Answer, as a whole answer is built."""
    answer = Answer(Shape("responses", turn.model, False, True), Started("", turn.model, "", 0))
    answer.id, answer.created_at = rid, turn.created_at
    answer.add(Delta(turn.answer, 0, tuple(CallDelta(i, c[0], c[1], c[2]) for i, c in enumerate(turn.calls))))
    return answer.result(Done(turn.finish_reason, *turn.usage, queue_ms=0, ttft_ms=0, total_ms=0))
