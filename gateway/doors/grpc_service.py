"""The gRPC front door: the public ``gateway.v1.Gateway`` service.

``Execute`` translates: ``gateway.doors.execute_wire`` reads the ``ExecuteRequest`` into the core's
draft and writes the core's events back as ``ExecuteResponse`` messages; ``RpcError`` becomes the
call's status with rich details. A client cancel or deadline cancels the handler, which closes the
core's generator: the core's one abort path cancels the request on the worker.

Bodies are decoded by ``gateway.doors.grpc_decoding``, so one protobuf cannot decode is
INVALID_ARGUMENT naming the field, not an UNKNOWN from gRPC's internals.

Sessions (``GetSession``, ``DeleteSession``: ``gateway.doors.sessions``) and jobs (``SubmitJob``,
``GetJob``, ``WatchJob``: ``gateway.doors.jobs``) are thin adapters too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import NoReturn

import grpc
from grpc._cython import cygrpc

from gateway.core.request_core import RequestCore
from gateway.doors import execute_wire
from gateway.doors import sessions as sessions_door
from gateway.doors.grpc_decoding import Undecodable, safe, safe_deserializer
from gateway.errors import RpcError, unavailable
from gateway.state.quota import StoreUnavailable
from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
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


def _decoded(handler):
    """A unary handler that first answers an undecodable body with INVALID_ARGUMENT naming its field."""

    @functools.wraps(handler)
    async def wrapper(request, context):
        if isinstance(request, Undecodable):
            await _abort(context, request.error())
        return await handler(request, context)

    return wrapper


def _decoded_stream(handler):
    """``_decoded`` for a handler that streams its answer."""

    @functools.wraps(handler)
    async def wrapper(request, context):
        if isinstance(request, Undecodable):
            await _abort(context, request.error())
        async for response in handler(request, context):
            yield response

    return wrapper


class GatewayService(gpb_grpc.GatewayServicer):
    def __init__(self, cfg: GatewayConfig, core: RequestCore, jobs=None):
        self.cfg = cfg
        self.core = core
        self.sessions = sessions_door.SessionApi(core)
        self.jobs = jobs  # gateway.doors.jobs.JobService, or None when gateway.jobs.enabled is off

    async def Execute(self, request, context: grpc.aio.ServicerContext):
        remaining = context.time_remaining()
        deadline = asyncio.get_running_loop().time() + remaining if remaining is not None else None
        reading = execute_wire.reading(request)
        try:
            async with contextlib.aclosing(self.core.run(_headers(context), reading, deadline, "grpc")) as events:
                async for ev in events:
                    yield execute_wire.response(ev)
        except RpcError as err:
            await _abort(context, err)

    async def GetQuota(self, request, context):
        try:
            principal = self.core.authenticate(_headers(context))
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
            stored = await self.sessions.get(_headers(context), request.session_id)
        except RpcError as err:
            await _abort(context, err)
        return sessions_door.to_proto(request.session_id, stored)

    async def DeleteSession(self, request, context):
        try:
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
            return await self._jobs().submit(_headers(context), request)
        except RpcError as err:
            await _abort(context, err)

    async def GetJob(self, request, context):
        try:
            return await self._jobs().get(_headers(context), request.job_id)
        except RpcError as err:
            await _abort(context, err)

    async def WatchJob(self, request, context):
        try:
            async with contextlib.aclosing(self._jobs().watch(_headers(context), request.job_id)) as events:
                async for ev in events:
                    yield ev
        except RpcError as err:
            await _abort(context, err)

    async def ListModels(self, request, context):
        try:
            self.core.authenticate(_headers(context))  # the catalog is for callers only
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


def add_to_server(service: GatewayService, server) -> None:
    """Register the service like the generated ``add_GatewayServicer_to_server``, but with safe
    deserializers (``gateway.doors.grpc_decoding``): Execute reports an undecodable body after it has
    authenticated the caller, the others before any work."""
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
            _decoded(service.GetSession),
            request_deserializer=safe(gpb.GetSessionRequest),
            response_serializer=gpb.Session.SerializeToString,
        ),
        "DeleteSession": grpc.unary_unary_rpc_method_handler(
            _decoded(service.DeleteSession),
            request_deserializer=safe(gpb.DeleteSessionRequest),
            response_serializer=gpb.DeleteSessionResponse.SerializeToString,
        ),
        "SubmitJob": grpc.unary_unary_rpc_method_handler(
            _decoded(service.SubmitJob),
            request_deserializer=safe(gpb.SubmitJobRequest),
            response_serializer=gpb.Job.SerializeToString,
        ),
        "GetJob": grpc.unary_unary_rpc_method_handler(
            _decoded(service.GetJob),
            request_deserializer=safe(gpb.GetJobRequest),
            response_serializer=gpb.Job.SerializeToString,
        ),
        "WatchJob": grpc.unary_stream_rpc_method_handler(
            _decoded_stream(service.WatchJob),
            request_deserializer=safe(gpb.WatchJobRequest),
            response_serializer=gpb.WatchJobResponse.SerializeToString,
        ),
    }
    name = gpb.DESCRIPTOR.services_by_name["Gateway"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
