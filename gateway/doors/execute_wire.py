"""The ``gateway.v1`` wire format of a request and its answer, shared by ``Execute`` and jobs.

``draft`` reads an ``ExecuteRequest`` into the core's ``RequestDraft``: only what protobuf itself needs
(the priority enum's numbers); every limit is the validator's. ``response`` and ``done`` write the
core's events back as ``ExecuteResponse`` and ``Done`` messages. Field names are the core's own, so
errors need no renaming on this door.
"""

from __future__ import annotations

from gateway.core.events import Delta, Done, Event, Started
from gateway.doors.grpc_decoding import Undecodable
from gateway.errors import RpcError, invalid_argument
from gateway.request import CONSTRAINT_KINDS, Constraint, RequestDraft, ToolUse
from gateway.v1 import gateway_pb2 as gpb
from gateway.vocabulary import FINISH_TO_PUBLIC, PRIORITY_FROM_WIRE
from igw_worker_api.v1 import worker_pb2 as wpb


def reading(req: gpb.ExecuteRequest | Undecodable) -> RequestDraft | RpcError:
    """What the request core is given for a received Execute request: its draft, or the error that
    explains why it is not one (a body protobuf cannot decode, a field out of range)."""
    try:
        return req.error() if isinstance(req, Undecodable) else draft(req)
    except RpcError as err:
        return err


def draft(req: gpb.ExecuteRequest) -> RequestDraft:
    if req.priority not in PRIORITY_FROM_WIRE:
        raise invalid_argument("priority", f"unknown priority value {req.priority}")
    s = req.sampling
    return RequestDraft(
        request_id=req.request_id,
        model=req.model,
        messages=tuple(_message(m) for m in req.messages),
        task=req.task,
        context=req.context if req.HasField("context") else None,
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        stop=tuple(s.stop),
        seed=s.seed if s.HasField("seed") else None,
        session_id=req.session_id,
        supersede_key=req.supersede_key,
        priority=PRIORITY_FROM_WIRE[req.priority],
        cache_bypass=req.cache_bypass,
        stream_interval_ms=req.stream_interval_ms if req.HasField("stream_interval_ms") else None,
        constraint=_constraint(req.constraint) if req.HasField("constraint") else None,
        tools=_tools(req) if req.tools or req.HasField("tool_choice") else None,
    )


def _message(m: gpb.ChatMessage) -> wpb.ChatMessage:
    calls = [wpb.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments_json) for c in m.tool_calls]
    return wpb.ChatMessage(role=m.role, content=m.content, tool_calls=calls, tool_call_id=m.tool_call_id)


_TOOL_MODES = {
    gpb.TOOL_CHOICE_MODE_UNSPECIFIED: "auto",
    gpb.TOOL_CHOICE_MODE_AUTO: "auto",
    gpb.TOOL_CHOICE_MODE_NONE: "none",
    gpb.TOOL_CHOICE_MODE_REQUIRED: "required",
}


def _tools(req: gpb.ExecuteRequest) -> ToolUse:
    tools = tuple(
        wpb.Tool(name=t.name, description=t.description, parameters_json_schema=t.parameters_json_schema)
        for t in req.tools
    )
    parallel = req.parallel_tool_calls if req.HasField("parallel_tool_calls") else True
    choice = req.tool_choice
    if choice.WhichOneof("choice") == "function_name":
        return ToolUse(tools, "named", choice.function_name, parallel)
    if choice.mode not in _TOOL_MODES:
        raise invalid_argument("tool_choice.mode", f"unknown tool choice mode {choice.mode}")
    return ToolUse(tools, _TOOL_MODES[choice.mode], "", parallel)


def _constraint(c: gpb.OutputConstraint) -> Constraint:
    kind = c.WhichOneof("kind")
    if kind is None:
        raise invalid_argument("constraint", f"set one of {', '.join(CONSTRAINT_KINDS)}, or leave it out")
    value = tuple(c.choice.choices) if kind == "choice" else getattr(c, kind)
    return Constraint(kind, value)


def done(ev: Done) -> gpb.Done:
    return gpb.Done(
        finish_reason=FINISH_TO_PUBLIC.get(ev.finish_reason, gpb.FINISH_REASON_UNSPECIFIED),
        usage=gpb.Usage(
            prompt_tokens=ev.prompt_tokens,
            completion_tokens=ev.completion_tokens,
            cached_prompt_tokens=ev.cached_prompt_tokens,
        ),
        timings=gpb.Timings(queue_ms=ev.queue_ms, ttft_ms=ev.ttft_ms, total_ms=ev.total_ms),
        cost_micros=ev.cost_micros,
        cache_hit=ev.cache_hit,
    )


def response(ev: Event) -> gpb.ExecuteResponse:
    if isinstance(ev, Delta):
        calls = [gpb.ToolCallDelta(index=c.index, id=c.id, name=c.name, arguments=c.arguments) for c in ev.tool_calls]
        return gpb.ExecuteResponse(delta=gpb.Delta(text=ev.text, tokens=ev.tokens, tool_calls=calls))
    if isinstance(ev, Started):
        return gpb.ExecuteResponse(
            started=gpb.Started(
                request_id=ev.request_id,
                model=ev.model,
                worker=ev.worker,
                prompt_tokens=ev.prompt_tokens,
                session_history_turns=ev.session_history_turns,
                session_turns_dropped=ev.session_turns_dropped,
            )
        )
    return gpb.ExecuteResponse(done=done(ev))
