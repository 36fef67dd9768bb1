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
import contextlib
import dataclasses
import logging
import time

import grpc

from gateway import tracing, validation
from gateway.config import GatewayConfig
from gateway.auth import Authenticator, Principal, permission_denied_model
from gateway.config import QuotaLimits
from gateway.errors import RpcError, invalid_argument, model_not_found, resource_exhausted, unavailable
from gateway.metrics import GatewayMetrics
from gateway.pool import Pool, WorkerConnection
from gateway.routing import affinity_key
from gateway.scheduler import QueueFull, Scheduler, Ticket
from gateway.quota import Budget, Denied, Quotas, StoreUnavailable, prompt_token_bound
from gateway.streaming import RequestStream
from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from inference.v1 import worker_pb2 as wpb

log = logging.getLogger("gateway.service")
request_log = logging.getLogger("gateway.requests")  # one line per finished request

# Rejection reasons by status, where the raising site did not name one.
_REJECTION = {
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.PERMISSION_DENIED: "permission_denied",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_argument",
    grpc.StatusCode.NOT_FOUND: "invalid_argument",
    grpc.StatusCode.UNAVAILABLE: "no_worker",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline_in_queue",
}


class _Trace:
    """The spans of one Execute: igw.execute with children auth, queue, dispatch, generate.

    Spans are passed explicitly rather than made "current": the handler is an
    async generator, and attaching contexts across its yields is fragile.
    """

    def __init__(self, tracer, metadata):
        self.root = tracer.start_span("igw.execute", context=tracing.extract(metadata), kind=tracing.SpanKind.SERVER)
        self._tracer = tracer
        self._ctx = tracing.set_span_in_context(self.root)
        self._child = None
        self.current_name = ""

    def begin(self, name: str, **attrs) -> None:
        """End the current phase's span and start the next."""
        if self._child is not None:
            self._child.end()
        self._child = self._tracer.start_span(name, context=self._ctx, attributes=attrs)
        self.current_name = name

    @contextlib.contextmanager
    def span(self, name: str):
        self.begin(name)
        yield
        self._child.end()
        self._child, self.current_name = None, ""

    def event(self, name: str, **attrs) -> None:
        (self._child or self.root).add_event(name, attrs)

    def carrier(self) -> dict[str, str]:
        return tracing.inject(self._child or self.root)

    def finish(self, rec: "_Record") -> None:
        if self._child is not None:
            self._child.end()
        self.root.set_attribute("igw.request_id", rec.request_id)
        self.root.set_attribute("igw.tenant", rec.tenant)
        self.root.set_attribute("gen_ai.request.model", rec.model)
        self.root.set_attribute("rpc.grpc.status_code", rec.code.value[0])
        self.root.end()


@dataclasses.dataclass
class _Record:
    """What the request log line and metrics say about one call."""

    request_id: str
    tenant: str = ""
    key_id: str = ""
    model: str = ""
    priority: str = ""
    finish_reason: str = ""
    pool: str = ""
    code: grpc.StatusCode = grpc.StatusCode.OK
    reason: str = ""

_FINISH = {"stop": gpb.FINISH_REASON_STOP, "length": gpb.FINISH_REASON_LENGTH}


class GatewayService(gpb_grpc.GatewayServicer):
    def __init__(self, cfg: GatewayConfig, pool: Pool, auth: Authenticator, quotas: Quotas, scheduler: Scheduler,
                 metrics: GatewayMetrics, tracer=None):
        self.cfg = cfg
        self.metrics = metrics
        self.tracer = tracer or tracing.tracer(None, "igw-gateway")
        self.pool = pool
        self.auth = auth
        self.quotas = quotas
        self.scheduler = scheduler

    async def Execute(self, request: gpb.ExecuteRequest, context: grpc.aio.ServicerContext):
        stream: RequestStream | None = None
        reservation = None
        rec = _Record(request_id=request.request_id)
        self.metrics.active_streams.inc()
        trace = _Trace(self.tracer, context.invocation_metadata())
        try:
            with trace.span("igw.auth"):
                principal = self.auth.authenticate(context.invocation_metadata())
            rec.tenant, rec.key_id = principal.tenant, principal.key_id
            valid = validation.validate(request, self.cfg.limits)
            rec.request_id = valid.request_id
            priority = rec.priority = validation.priority(request, principal.priority_max)
            model = rec.model = self._resolve_model(valid.model)
            if not principal.may_use(model):
                raise permission_denied_model(principal, model)
            validation.check_fits_model(valid, model, self.pool.max_context_tokens(model), self.cfg.limits)
            cost = prompt_token_bound(valid.messages) + valid.sampling.max_tokens
            trace.begin("igw.queue")
            reservation = await self._reserve(principal, cost)

            stream = RequestStream(valid.request_id, model, valid.sampling.max_tokens, cost,
                                   retries=self.cfg.queue.retry_before_first_token)
            sticky = principal.tenant if self.cfg.pool_affinity == "tenant" else request.session_id or principal.tenant
            ticket = Ticket(model=model, tenant=principal.tenant, priority=priority, cost_tokens=cost,
                            affinity=affinity_key(request.session_id, valid.messages),
                            pool=self.pool.choose_pool(model, sticky))
            started_sent = False
            loop = asyncio.get_running_loop()
            remaining = context.time_remaining()
            deadline = loop.time() + remaining if remaining is not None else None

            def submit_to(worker: WorkerConnection) -> None:
                left_ms = int((deadline - loop.time()) * 1000) if deadline is not None else 0
                trace.begin("igw.dispatch", worker=worker.address)
                rec.pool = worker.pool
                worker.submit(stream, wpb.Submit(trace_context=trace.carrier(),
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
                        self.quotas.trim(reservation, update.accepted_prompt_tokens + valid.sampling.max_tokens)
                        if not started_sent:
                            started_sent = True
                            yield gpb.ExecuteResponse(started=gpb.Started(
                                request_id=stream.request_id, model=model, worker=stream.worker_name,
                                prompt_tokens=update.accepted_prompt_tokens))
                    elif update.retry_from is not None:
                        log.warning("request %s: worker %s failed before the first token; retrying elsewhere",
                                    stream.request_id, update.retry_from.name)
                        self.metrics.retries.inc()
                        ticket = dataclasses.replace(ticket, exclude=ticket.exclude | {update.retry_from},
                                                     granted=loop.create_future(), pool="")  # any pool now
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
                        rec.finish_reason = update.finish_reason
                        trace.event("finish", finish_reason=update.finish_reason)
                        yield gpb.ExecuteResponse(done=self._done(stream, update.finish_reason))
                        return
                    else:
                        if trace.current_name == "igw.dispatch":
                            trace.event("first_token")
                            trace.begin("igw.generate")
                        yield gpb.ExecuteResponse(delta=gpb.Delta(text=update.text, tokens=update.tokens))
        except RpcError as err:
            rec.code, rec.reason = err.code, err.reason or _REJECTION.get(err.code, "")
            await context.abort_with_status(err.to_status())
        except Exception:
            rec.code = grpc.StatusCode.INTERNAL  # a bug: grpc answers INTERNAL; the log has the traceback
            log.exception("request %s failed", rec.request_id)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            remaining = context.time_remaining()
            rec.code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
                else grpc.StatusCode.CANCELLED
            raise
        finally:
            # Client gone, deadline passed, or we failed mid-way: free the engine.
            if stream is not None and stream.worker is not None and not stream.finished:
                stream.worker.cancel(stream.request_id,
                                     "deadline" if rec.code == grpc.StatusCode.DEADLINE_EXCEEDED else "cancelled")
            if reservation is not None:
                used = stream.prompt_tokens + stream.completion_tokens if stream else 0
                self.quotas.settle(reservation, used)
            self.metrics.active_streams.dec()
            self._account(rec, stream, request)
            trace.finish(rec)

    def _account(self, rec: "_Record", stream: RequestStream | None, request: gpb.ExecuteRequest) -> None:
        """Metrics and the one JSON log line of a finished request."""
        m, code = self.metrics, rec.code.name
        m.requests.labels(rec.model, rec.tenant, code, rec.pool).inc()
        if rec.reason and (stream is None or stream.dispatched_at is None):
            m.rejections.labels(rec.reason, rec.tenant).inc()
        fields = {"event": "request", "request_id": rec.request_id, "tenant": rec.tenant, "key_id": rec.key_id,
                  "model": rec.model, "priority": rec.priority, "pool": rec.pool, "status": code, "finish_reason": rec.finish_reason}
        if stream is not None:
            now = time.monotonic()
            if stream.dispatched_at is not None:
                m.queue_wait.labels(rec.model, rec.priority).observe(stream.dispatched_at - stream.created)
            if stream.first_token_at is not None:
                m.ttft.labels(rec.model, rec.pool).observe(stream.first_token_at - stream.created)
            itl = m.itl.labels(rec.model)  # one label lookup, not one per token
            for per_token, n in stream.itl_samples:
                for _ in range(n):
                    itl.observe(per_token)
            m.duration.labels(rec.model, rec.pool).observe(now - stream.created)
            m.tokens.labels(rec.tenant, rec.model, "input").inc(stream.prompt_tokens)
            m.tokens.labels(rec.tenant, rec.model, "output").inc(stream.completion_tokens)
            fields.update(worker=stream.worker_name, prompt_tokens=stream.prompt_tokens,
                          completion_tokens=stream.completion_tokens,
                          queue_ms=stream.ms_since_created(stream.dispatched_at) if stream.dispatched_at else None,
                          ttft_ms=stream.ms_since_created(stream.first_token_at) if stream.first_token_at else None,
                          total_ms=stream.ms_since_created(None))
        if self.cfg.log_prompts:
            fields["task"] = request.task
        request_log.info("request %s %s", rec.request_id, code, extra={"fields": fields})

    async def _wait_for_worker(self, ticket: Ticket, context) -> WorkerConnection:
        """Queue until a worker has room. Cancel or deadline while queued: out of the queue at once."""
        if not self.pool.can_serve(ticket.model, ticket.exclude):
            raise self.pool.no_worker_error(ticket.model)
        try:
            self.scheduler.enqueue(ticket)
        except QueueFull:
            err = resource_exhausted(
                f"the gateway's queue is full ({self.scheduler.max_queued} requests waiting)", 1.0,
                [("gateway:queue", "admission queue full")])
            err.reason = "queue_full"
            raise err from None
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
            err = resource_exhausted(
                f"quota exceeded: {denied}", denied.retry_after_s,
                [(v.budget.subject, v.description) for v in denied.violations])
            err.reason = "quota_" + denied.violations[0].kind
            raise err from None
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
