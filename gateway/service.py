"""The gRPC front door: the public ``gateway.v1.Gateway`` service.

``Execute`` is a thin adapter over the request core (``gateway.dispatch``):
it validates the protobuf request, maps the core's events to
``ExecuteResponse`` messages and its errors to gRPC statuses. A client
cancel or deadline cancels the handler, which closes the core's generator:
the core's one abort path cancels the request on the worker.

Requests are decoded by ``safe_deserializer``, so a body protobuf cannot
decode (e.g. ``context`` nested deeper than protobuf allows, invalid UTF-8)
is INVALID_ARGUMENT naming the field, not an UNKNOWN from gRPC's internals.

Sessions (``GetSession``, ``DeleteSession``: ``gateway.sessions.SessionApi``) and jobs (``SubmitJob``,
``GetJob``, ``WatchJob``: ``gateway.jobs.JobService``) are thin adapters too, with safe deserializers.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import NoReturn

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from grpc._cython import cygrpc

from gateway import sessions as sessions_mod
from gateway import validation
from gateway.dispatch import Delta, Dispatcher, Done, Started
from gateway.errors import RpcError, unavailable
from gateway.quota import StoreUnavailable
from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from gateway.validation import Undecodable
from gateway.vocabulary import FINISH_TO_PUBLIC
from igw_common.config import NO_LIMITS, GatewayConfig


def _headers(context) -> tuple[tuple[str, str], ...]:
    return tuple(context.invocation_metadata() or ())


# gRPC's error for a batch the core refused because the call had already ended. It is not public API, so
# a grpc without it makes the except clause below catch nothing (the traceback comes back, nothing breaks).
_CALL_ENDED_IN_CORE = getattr(cygrpc, "ExecuteBatchError", ())


async def _abort(context, err: RpcError) -> NoReturn:
    """End the call with ``err``'s status (and its rich details).

    When the client's deadline passes, gRPC's core ends the call at the same moment our own deadline
    raises DEADLINE_EXCEEDED, so the status can meet a call that is already over: sending it then fails
    with ExecuteBatchError, which gRPC logs with a traceback unless it has seen the close first. The
    client has its status from the core either way; end the handler as a cancelled call, quietly.
    """
    try:
        await context.abort_with_status(err.to_status())
    except _CALL_ENDED_IN_CORE:
        raise asyncio.CancelledError from None


class GatewayService(gpb_grpc.GatewayServicer):
    def __init__(self, cfg: GatewayConfig, core: Dispatcher, jobs=None):
        self.cfg = cfg
        self.core = core
        self.sessions = sessions_mod.SessionApi(core)
        self.jobs = jobs  # gateway.jobs.JobService, or None when gateway.jobs.enabled is off

    async def Execute(self, request, context: grpc.aio.ServicerContext):
        remaining = context.time_remaining()
        loop_deadline = asyncio.get_running_loop().time() + remaining if remaining is not None else None

        def parse() -> validation.ValidRequest:
            if isinstance(request, Undecodable):
                raise request.error()
            return validation.validate(request, self.cfg.limits)

        try:
            async with contextlib.aclosing(
                self.core.execute(_headers(context), parse, loop_deadline, "grpc")
            ) as events:
                async for ev in events:
                    if isinstance(ev, Delta):
                        yield gpb.ExecuteResponse(delta=gpb.Delta(text=ev.text, tokens=ev.tokens))
                    elif isinstance(ev, Started):
                        yield gpb.ExecuteResponse(
                            started=gpb.Started(
                                request_id=ev.request_id,
                                model=ev.model,
                                worker=ev.worker,
                                prompt_tokens=ev.prompt_tokens,
                                session_history_turns=ev.session_history_turns,
                                session_turns_dropped=ev.session_turns_dropped,
                            )
                        )
                    elif isinstance(ev, Done):
                        yield gpb.ExecuteResponse(
                            done=gpb.Done(
                                finish_reason=FINISH_TO_PUBLIC[ev.finish_reason],
                                usage=gpb.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens),
                                timings=gpb.Timings(queue_ms=ev.queue_ms, ttft_ms=ev.ttft_ms, total_ms=ev.total_ms),
                                cost_micros=ev.cost_micros,
                                cache_hit=ev.cache_hit,
                            )
                        )
        except RpcError as err:
            await _abort(context, err)

    async def GetQuota(self, request, context):
        try:
            principal = self.core.auth.authenticate(_headers(context))
            budgets = [b for b in self.core.budgets(principal) if b.limits != NO_LIMITS]
            left = await self.core.quotas.remaining(budgets) if budgets else []
        except RpcError as err:
            await _abort(context, err)
        except StoreUnavailable:
            await _abort(context, unavailable("the quota store is unreachable; retry shortly", 1.0))
        return gpb.GetQuotaResponse(
            tenant=principal.tenant,
            budgets=[
                gpb.QuotaBudget(
                    scope=r.budget.scope,
                    name=r.budget.name,
                    requests_per_minute=r.budget.limits.requests_per_minute,
                    tokens_per_minute=r.budget.limits.tokens_per_minute,
                    concurrent_streams=r.budget.limits.concurrent_streams,
                    requests_available=_u32(r.requests_available) if r.budget.limits.requests_per_minute else 0,
                    tokens_available=_u32(r.tokens_available) if r.budget.limits.tokens_per_minute else 0,
                    concurrent_streams_in_use=_u32(r.concurrent_in_use),
                    spend_per_day_limit_micros=r.budget.day_limit,
                    spent_today_micros=max(0, r.spent_today) if r.budget.day_limit else 0,
                    spend_per_month_limit_micros=r.budget.month_limit,
                    spent_this_month_micros=max(0, r.spent_this_month) if r.budget.month_limit else 0,
                )
                for r in left
            ],
            currency=self.core.pricing.currency,
        )

    # --- server-side sessions -------------------------------------------------------------------

    async def GetSession(self, request, context):
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            stored = await self.sessions.get(_headers(context), request.session_id)
        except RpcError as err:
            await _abort(context, err)
        return sessions_mod.to_proto(request.session_id, stored)

    async def DeleteSession(self, request, context):
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            await self.sessions.delete(_headers(context), request.session_id)
        except RpcError as err:
            await _abort(context, err)
        return gpb.DeleteSessionResponse()

    # --- background jobs -------------------------------------------------------------------------

    def _jobs(self):
        if self.jobs is None:
            raise RpcError(
                grpc.StatusCode.UNIMPLEMENTED,
                "background jobs are off on this gateway (gateway.jobs.enabled)",
                reason="jobs_off",
            )
        return self.jobs

    async def SubmitJob(self, request, context):
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            return await self._jobs().submit(_headers(context), request)
        except RpcError as err:
            await _abort(context, err)

    async def GetJob(self, request, context):
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            return await self._jobs().get(_headers(context), request.job_id)
        except RpcError as err:
            await _abort(context, err)

    async def WatchJob(self, request, context):
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            async with contextlib.aclosing(self._jobs().watch(_headers(context), request.job_id)) as events:
                async for ev in events:
                    yield ev
        except RpcError as err:
            await _abort(context, err)

    async def ListModels(self, request, context):
        try:
            self.core.auth.authenticate(_headers(context))  # the catalog is for callers only
        except RpcError as err:
            await _abort(context, err)
        workers = self.core.workers
        default = workers.default_model()
        return gpb.ListModelsResponse(
            models=[
                gpb.ModelInfo(
                    name=name,
                    max_context_tokens=workers.max_context_tokens(name) or 0,
                    ready_workers=len(serving),
                    is_default=name == default,
                )
                for name, serving in sorted(workers.models().items())
            ]
        )


def _u32(value: float) -> int:
    return max(0, min(int(value), 2**32 - 1))


def _lenient_request_class():
    """ExecuteRequest with every string and message field as ``bytes``: it decodes whatever the real one
    cannot, so the field at fault can be named."""
    proto = descriptor_pb2.FileDescriptorProto()
    gpb.DESCRIPTOR.CopyToProto(proto)
    msg = next(m for m in proto.message_type if m.name == "ExecuteRequest")
    for f in msg.field:
        if f.type in (f.TYPE_STRING, f.TYPE_MESSAGE, f.TYPE_ENUM):
            f.type = f.TYPE_INT32 if f.type == f.TYPE_ENUM else f.TYPE_BYTES
            f.ClearField("type_name")
    lenient = descriptor_pb2.FileDescriptorProto(
        name="igw_lenient.proto", package="igw.lenient", syntax="proto3", message_type=[msg]
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(lenient)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("igw.lenient.ExecuteRequest"))


_LENIENT = _lenient_request_class()
_SUBMESSAGES = {"context": gpb.ExecuteRequest().context.__class__, "sampling": gpb.SamplingParams}


def _explain(data: bytes) -> Undecodable:
    try:
        raw = _LENIENT.FromString(data)
    except DecodeError:
        return Undecodable("request", "the body is not a gateway.v1.ExecuteRequest message")
    for f in _LENIENT.DESCRIPTOR.fields:
        if f.is_repeated or f.type != f.TYPE_BYTES:
            continue
        value = getattr(raw, f.name)
        if f.name in _SUBMESSAGES:
            try:
                _SUBMESSAGES[f.name].FromString(value)
            except DecodeError:
                why = (
                    "nested too deeply or malformed; keep it within gateway.limits.max_context_depth levels"
                    if f.name == "context"
                    else "cannot be decoded"
                )
                return Undecodable(f.name, why)
        else:
            try:
                value.decode()
            except UnicodeDecodeError:
                return Undecodable(f.name, "is not valid UTF-8")
    return Undecodable("messages", "a chat message cannot be decoded (invalid UTF-8 or malformed)")


def safe_deserializer(data: bytes):
    try:
        return gpb.ExecuteRequest.FromString(data)
    except DecodeError:
        return _explain(data)


def _lenient(name: str):
    """Message ``name`` with its string and message fields as ``bytes``, to find the one at fault."""
    proto = descriptor_pb2.FileDescriptorProto()
    gpb.DESCRIPTOR.CopyToProto(proto)
    msg = next(m for m in proto.message_type if m.name == name)
    for f in msg.field:
        if f.type in (f.TYPE_STRING, f.TYPE_MESSAGE, f.TYPE_ENUM):
            f.type = f.TYPE_INT32 if f.type == f.TYPE_ENUM else f.TYPE_BYTES
            f.ClearField("type_name")
    lenient = descriptor_pb2.FileDescriptorProto(
        name=f"igw_lenient_{name}.proto", package="igw.lenient", syntax="proto3", message_type=[msg]
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(lenient)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"igw.lenient.{name}"))


def _safe(cls):
    """A deserializer for a request of strings (and, for SubmitJobRequest, an ExecuteRequest): what protobuf
    cannot decode becomes an ``Undecodable`` naming the field."""
    lenient = _lenient(cls.DESCRIPTOR.name)

    def explain(data: bytes) -> Undecodable:
        try:
            raw = lenient.FromString(data)
        except DecodeError:
            return Undecodable("request", f"the body is not a {cls.DESCRIPTOR.full_name} message")
        for f in lenient.DESCRIPTOR.fields:
            if f.type != f.TYPE_BYTES or f.is_repeated:
                continue
            value = getattr(raw, f.name)
            if f.name == "request":  # SubmitJobRequest.request: an ExecuteRequest
                try:
                    gpb.ExecuteRequest.FromString(value)
                except DecodeError:
                    inner = _explain(value)
                    return Undecodable(f"request.{inner.field}", inner.description)
                continue
            try:
                value.decode()
            except UnicodeDecodeError:
                return Undecodable(f.name, "is not valid UTF-8")
        return Undecodable("request", "cannot be decoded")

    def deserialize(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError:
            return explain(data)

    return deserialize


def add_to_server(service: GatewayService, server) -> None:
    """Register the service like the generated ``add_GatewayServicer_to_server``, but with
    ``safe_deserializer`` for Execute."""
    handlers = {
        "Execute": grpc.unary_stream_rpc_method_handler(
            service.Execute,
            request_deserializer=safe_deserializer,
            response_serializer=gpb.ExecuteResponse.SerializeToString,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            service.ListModels,
            request_deserializer=gpb.ListModelsRequest.FromString,
            response_serializer=gpb.ListModelsResponse.SerializeToString,
        ),
        "GetQuota": grpc.unary_unary_rpc_method_handler(
            service.GetQuota,
            request_deserializer=gpb.GetQuotaRequest.FromString,
            response_serializer=gpb.GetQuotaResponse.SerializeToString,
        ),
        "GetSession": grpc.unary_unary_rpc_method_handler(
            service.GetSession,
            request_deserializer=_safe(gpb.GetSessionRequest),
            response_serializer=gpb.Session.SerializeToString,
        ),
        "DeleteSession": grpc.unary_unary_rpc_method_handler(
            service.DeleteSession,
            request_deserializer=_safe(gpb.DeleteSessionRequest),
            response_serializer=gpb.DeleteSessionResponse.SerializeToString,
        ),
        "SubmitJob": grpc.unary_unary_rpc_method_handler(
            service.SubmitJob,
            request_deserializer=_safe(gpb.SubmitJobRequest),
            response_serializer=gpb.Job.SerializeToString,
        ),
        "GetJob": grpc.unary_unary_rpc_method_handler(
            service.GetJob,
            request_deserializer=_safe(gpb.GetJobRequest),
            response_serializer=gpb.Job.SerializeToString,
        ),
        "WatchJob": grpc.unary_stream_rpc_method_handler(
            service.WatchJob,
            request_deserializer=_safe(gpb.WatchJobRequest),
            response_serializer=gpb.WatchJobResponse.SerializeToString,
        ),
    }
    name = gpb.DESCRIPTOR.services_by_name["Gateway"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
