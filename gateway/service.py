"""The public ``gateway.v1.Gateway`` service.

Execute walks the data path in order: authenticate -> validate -> resolve
model (and check the caller may use it) -> reserve quota -> queue until a
worker has room (``scheduler``) -> submit to it -> stream ``started``,
``delta``s and ``done`` back -> settle quota. Whatever
ends the call early (client cancel, deadline, a failed write) cancels the
request on the worker in the ``finally`` below.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import grpc

from gateway import validation
from gateway.config import GatewayConfig
from gateway.auth import Authenticator, Principal, permission_denied_model
from gateway.config import QuotaLimits
from gateway.errors import RpcError, invalid_argument, model_not_found, resource_exhausted, unavailable
from gateway.pool import Pool, WorkerConnection
from gateway.routing import affinity_key
from gateway.scheduler import QueueFull, Scheduler, Ticket
from gateway.quota import Budget, Denied, Quotas, StoreUnavailable, prompt_token_bound
from gateway.streaming import RequestStream
from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from inference.v1 import worker_pb2 as wpb

log = logging.getLogger("gateway.service")

_FINISH = {"stop": gpb.FINISH_REASON_STOP, "length": gpb.FINISH_REASON_LENGTH}


class GatewayService(gpb_grpc.GatewayServicer):
    def __init__(self, cfg: GatewayConfig, pool: Pool, auth: Authenticator, quotas: Quotas, scheduler: Scheduler):
        self.cfg = cfg
        self.pool = pool
        self.auth = auth
        self.quotas = quotas
        self.scheduler = scheduler

    async def Execute(self, request: gpb.ExecuteRequest, context: grpc.aio.ServicerContext):
        stream: RequestStream | None = None
        reservation = None
        try:
            principal = self.auth.authenticate(context.invocation_metadata())
            valid = validation.validate(request, self.cfg.limits)
            priority = validation.priority(request, principal.priority_max)
            model = self._resolve_model(valid.model)
            if not principal.may_use(model):
                raise permission_denied_model(principal, model)
            validation.check_fits_model(valid, model, self.pool.max_context_tokens(model), self.cfg.limits)
            cost = prompt_token_bound(valid.messages) + valid.sampling.max_tokens
            reservation = await self._reserve(principal, cost)

            stream = RequestStream(valid.request_id, model, valid.sampling.max_tokens, cost,
                                   retries=self.cfg.queue.retry_before_first_token)
            ticket = Ticket(model=model, tenant=principal.tenant, priority=priority, cost_tokens=cost,
                            affinity=affinity_key(request.session_id, valid.messages))
            started_sent = False
            loop = asyncio.get_running_loop()
            remaining = context.time_remaining()
            deadline = loop.time() + remaining if remaining is not None else None

            def submit_to(worker: WorkerConnection) -> None:
                left_ms = int((deadline - loop.time()) * 1000) if deadline is not None else 0
                worker.submit(stream, wpb.Submit(
                    request_id=valid.request_id, model=model, messages=valid.messages, sampling=valid.sampling,
                    # The worker aborts on its own too, should our cancel be lost.
                    timeout_ms=max(1, left_ms) if deadline is not None else 0))

            ticket.on_grant = submit_to
            while True:  # once, plus once per retry after a worker failed before answering
                await self._wait_for_worker(ticket, context)
                while True:
                    update = await stream.next()
                    if update.accepted_prompt_tokens is not None:
                        # The real prompt is known: hold only prompt + max_tokens from now on.
                        await self.quotas.trim(reservation, update.accepted_prompt_tokens + valid.sampling.max_tokens)
                        if not started_sent:
                            started_sent = True
                            yield gpb.ExecuteResponse(started=gpb.Started(
                                request_id=stream.request_id, model=model, worker=stream.worker_name,
                                prompt_tokens=update.accepted_prompt_tokens))
                    elif update.retry_from is not None:
                        log.warning("request %s: worker %s failed before the first token; retrying elsewhere",
                                    stream.request_id, update.retry_from.name)
                        ticket = dataclasses.replace(ticket, exclude=ticket.exclude | {update.retry_from},
                                                     granted=loop.create_future())
                        stream.resume()
                        break
                    elif update.error is not None:
                        code, message, field = update.error
                        if code == grpc.StatusCode.INVALID_ARGUMENT and field:
                            raise invalid_argument(field, message)
                        # Usage so far rides in the trailers, e.g. for a stream cut by a dead worker.
                        raise RpcError(code, message, trailers=(
                            ("igw-prompt-tokens", str(stream.prompt_tokens)),
                            ("igw-completion-tokens", str(stream.completion_tokens))))
                    elif update.finish_reason is not None:
                        yield gpb.ExecuteResponse(done=self._done(stream, update.finish_reason))
                        return
                    else:
                        yield gpb.ExecuteResponse(delta=gpb.Delta(text=update.text, tokens=update.tokens))
        except RpcError as err:
            await context.abort_with_status(err.to_status())
        finally:
            # Client gone, deadline passed, or we failed mid-way: free the engine.
            if stream is not None and stream.worker is not None and not stream.finished:
                stream.worker.cancel(stream.request_id)
            if reservation is not None:
                used = stream.prompt_tokens + stream.completion_tokens if stream else 0
                self.quotas.settle(reservation, used)

    async def _wait_for_worker(self, ticket: Ticket, context) -> WorkerConnection:
        """Queue until a worker has room. Cancel or deadline while queued: out of the queue at once."""
        if not self.pool.can_serve(ticket.model, ticket.exclude):
            raise self.pool.no_worker_error(ticket.model)
        try:
            self.scheduler.enqueue(ticket)
        except QueueFull:
            raise resource_exhausted(
                f"the gateway's queue is full ({self.scheduler.max_queued} requests waiting)", 1.0,
                [("gateway:queue", "admission queue full")]) from None
        remaining = context.time_remaining()
        try:
            return await asyncio.wait_for(asyncio.shield(ticket.granted), remaining)
        except TimeoutError:
            raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           "the deadline passed while the request waited for a worker; it never started") from None
        finally:
            if not ticket.granted.done():
                self.scheduler.cancel(ticket)
                ticket.granted.cancel()

    def _budgets(self, principal: Principal) -> list[Budget]:
        budgets = []
        if principal.key_id:
            limits = principal.key_limits
            if limits == QuotaLimits():
                limits = self.cfg.quota.default_key_limits
            budgets.append(Budget("key", principal.key_id, limits))
        budgets.append(Budget("tenant", principal.tenant, principal.tenant_limits))
        return budgets

    async def _reserve(self, principal: Principal, tokens: int):
        try:
            return await self.quotas.reserve(self._budgets(principal), tokens)
        except Denied as denied:
            raise resource_exhausted(
                f"quota exceeded: {denied}", denied.retry_after_s,
                [(v.budget.subject, v.description) for v in denied.violations]) from None
        except StoreUnavailable:
            raise unavailable("the quota store is unreachable and this gateway fails closed; retry shortly", 1.0) from None

    def _resolve_model(self, asked: str) -> str:
        models = self.pool.models()
        model = asked or self.pool.default_model()
        if model in models:
            if not models[model]:
                raise self.pool.no_worker_error(model)
            return model
        if not model:
            raise self.pool.no_worker_error("")
        if any(w.info is None for w in self.pool.workers):
            # A worker we never reached might serve it: do not claim it does not exist.
            raise self.pool.no_worker_error(model)
        raise model_not_found(model, sorted(models))

    @staticmethod
    def _done(stream: RequestStream, finish_reason: str) -> gpb.Done:
        return gpb.Done(
            finish_reason=_FINISH[finish_reason],
            usage=gpb.Usage(prompt_tokens=stream.prompt_tokens, completion_tokens=stream.completion_tokens),
            timings=gpb.Timings(
                queue_ms=stream.ms_since_created(stream.dispatched_at),
                ttft_ms=stream.ms_since_created(stream.first_token_at),
                total_ms=stream.ms_since_created(None),
            ),
        )

    async def GetQuota(self, request, context):
        try:
            principal = self.auth.authenticate(context.invocation_metadata())
            budgets = [b for b in self._budgets(principal) if b.limits != QuotaLimits()]
            left = await self.quotas.remaining(budgets) if budgets else []
        except RpcError as err:
            await context.abort_with_status(err.to_status())
        except StoreUnavailable:
            await context.abort_with_status(unavailable("the quota store is unreachable; retry shortly", 1.0).to_status())
        return gpb.GetQuotaResponse(tenant=principal.tenant, budgets=[
            gpb.QuotaBudget(
                scope=r.budget.scope, name=r.budget.name,
                requests_per_minute=r.budget.limits.requests_per_minute,
                tokens_per_minute=r.budget.limits.tokens_per_minute,
                concurrent_streams=r.budget.limits.concurrent_streams,
                requests_available=int(r.requests_available) if r.budget.limits.requests_per_minute else 0,
                tokens_available=int(r.tokens_available) if r.budget.limits.tokens_per_minute else 0,
                concurrent_streams_in_use=r.concurrent_in_use,
            ) for r in left])

    async def ListModels(self, request, context):
        default = self.pool.default_model()
        return gpb.ListModelsResponse(models=[
            gpb.ModelInfo(
                name=name,
                max_context_tokens=self.pool.max_context_tokens(name) or 0,
                ready_workers=len(workers),
                is_default=name == default,
            )
            for name, workers in sorted(self.pool.models().items())
        ])
