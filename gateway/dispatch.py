"""The request core: one request from admission to settlement, for every front door.

    admit (authenticate, validate, resolve the model)
      -> reserve quota -> queue (``scheduler``) -> place (``placement``, which
      claims the worker's room) -> stream (``connection`` + ``streaming``)
      -> settle (refund unused quota, metrics, one log line, spans)

with one abort path: whatever ends a request early (client cancel or
disconnect, deadline, an error) runs the same ``finally``, which cancels it
on the worker (vLLM aborts it within one engine step), gives back any room
it held and settles its quota.

State that outlives a stream joins here, so every door gets it: server-side
sessions (``gateway.sessions``: the stored history goes around the new turn
before admission; the turn is written only at ``done``), the response cache
(``gateway.cache``: a hit replays a stored answer instead of queueing; a miss
is recorded and stored at ``done``), and what a request costs
(``gateway.quota.pricing``: reserved with the quota at admission, settled to
the real cost). Background jobs (``gateway.jobs``) run through ``execute``
with the principal that submitted them.

Front doors (gRPC ``Execute`` in ``gateway.service``) are thin adapters: they
turn their own request into a ``ValidRequest`` (the ``parse`` callback, so
errors name their own fields), iterate ``execute``'s events (``Started``,
``Delta``, ``Done``) and map ``RpcError`` to their own status. Whatever one
door gets (auth, quotas, priority, fairness, deadlines, cancel, metrics,
log line, traces), every door gets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from gateway.auth import Authenticator, Principal
from gateway.cache import Entry, Flight, ResponseCache
from gateway.connection import Claim, Job
from gateway.errors import (
    SUPERSEDED_MESSAGE,
    RpcError,
    deadline_exceeded,
    invalid_argument,
    model_not_found,
    permission_denied,
    resource_exhausted,
    superseded,
    unavailable,
)
from gateway.membership import WorkerSet
from gateway.metrics import GatewayMetrics
from gateway.observe import RequestRecord, excerpt, request_trace
from gateway.placement import Placement, affinity_key
from gateway.quota import MICROS, Budget, Denied, Pricing, Quotas, StoreUnavailable, prompt_token_bound
from gateway.redis_state import StateUnavailable
from gateway.scheduler import QueueFull, Scheduler, Ticket
from gateway.sessions import ActiveTurn, Sessions
from gateway.streaming import Pacer, RequestStream
from gateway.validation import ValidRequest, estimate_prompt_tokens
from gateway.vocabulary import priority_allowed
from igw_common.config import NO_LIMITS, GatewayConfig
from inference.v1 import worker_pb2 as wpb

log = logging.getLogger("gateway.dispatch")


@dataclass(slots=True)
class Started:
    request_id: str
    model: str
    worker: str
    prompt_tokens: int
    session_history_turns: int = 0  # server-side sessions: earlier turns sent with this one
    session_turns_dropped: int = 0  # ... and the oldest ones trimmed to fit
    cache_hit: bool = False


@dataclass(slots=True)
class Delta:
    text: str
    tokens: int


@dataclass(slots=True)
class Done:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    queue_ms: int
    ttft_ms: int
    total_ms: int
    cost_micros: int = 0  # micro-units of gateway.pricing.currency
    cache_hit: bool = False


Event = Started | Delta | Done


class Superseded(Exception):
    """Set on a queued ticket's grant when a newer request with the same key replaces it."""


class _Holder:
    """A request that holds a supersede key: where it is now, so a newer one can stop it there."""

    __slots__ = ("key", "ticket", "stream", "superseded")

    def __init__(self, key: tuple[str, str]):
        self.key, self.ticket, self.stream, self.superseded = key, None, None, False

    def supersede(self, scheduler: Scheduler) -> None:
        self.superseded = True
        stream, ticket = self.stream, self.ticket
        if stream is not None and stream.worker is not None and not stream.finished:
            stream.worker.cancel(stream, "superseded")  # the engine stops within a step; its room is free now
            stream.on_error(grpc.StatusCode.ABORTED, SUPERSEDED_MESSAGE)
        elif ticket is not None and not ticket.granted.done():
            ticket.granted.set_exception(Superseded())
            scheduler.cancel(ticket)
        # Otherwise it is between steps (reserving quota): it sees the flag at the next one.


class Supersession:
    """(tenant, supersede key) -> the request holding it. Entries live as long as their request."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self._holders: dict[tuple[str, str], _Holder] = {}

    def take(self, tenant: str, key: str) -> _Holder:
        """Hold ``key`` for a new request, superseding the one that held it."""
        holder = _Holder((tenant, key))
        previous = self._holders.get(holder.key)
        self._holders[holder.key] = holder
        if previous is not None:
            previous.supersede(self.scheduler)
        return holder

    def release(self, holder: _Holder) -> None:
        if self._holders.get(holder.key) is holder:
            del self._holders[holder.key]

    def __len__(self) -> int:
        return len(self._holders)


def _usage_trailers(stream: RequestStream) -> tuple:
    return (("igw-prompt-tokens", str(stream.prompt_tokens)), ("igw-completion-tokens", str(stream.completion_tokens)))


class Dispatcher:
    def __init__(
        self,
        cfg: GatewayConfig,
        workers: WorkerSet,
        placement: Placement,
        auth: Authenticator,
        quotas: Quotas,
        scheduler: Scheduler,
        metrics: GatewayMetrics,
        tracer,
        pricing: Pricing | None = None,
        cache: ResponseCache | None = None,
        sessions: Sessions | None = None,
    ):
        self.cfg = cfg
        self.workers = workers
        self.placement = placement
        self.auth = auth
        self.quotas = quotas
        self.scheduler = scheduler
        self.metrics = metrics
        self.tracer = tracer
        self.supersession = Supersession(scheduler)
        self.pacer = Pacer()
        self.pricing = pricing or Pricing(cfg.pricing)
        self.cache = cache  # None: gateway.cache.enabled is off
        self.sessions = sessions  # None: gateway.sessions.enabled is off

    async def execute(
        self,
        headers,
        parse: Callable[[], ValidRequest],
        deadline: float | None,
        door: str,
        principal: Principal | None = None,
    ) -> AsyncIterator[Event]:
        """Run one request. ``headers``: the caller's metadata (lower-case names); ``deadline``: event-loop
        time or None; ``principal``: the caller when it was authenticated earlier (a job runs as whoever
        submitted it). Raises ``RpcError`` for every refusal or failure; the caller must close the
        generator (``contextlib.aclosing``) so an abandoned request is aborted at once."""
        m = self.metrics
        loop = asyncio.get_running_loop()
        rec = RequestRecord(door=door)
        trace = request_trace(self.tracer, headers)
        stream: RequestStream | None = None
        claim: Claim | None = None
        reservation = None
        settle_as: tuple[int, int] | None = None  # (tokens, cost) a cache hit is charged
        holder: _Holder | None = None
        turn: ActiveTurn | None = None
        flight: Flight | None = None
        m.active_streams.inc()
        try:
            with trace.span("igw.auth"):
                principal = principal or self.auth.authenticate(headers)
            rec.tenant, rec.key_id = principal.tenant, principal.key_id
            rec.tenant_label = self.auth.tenant_label(principal.tenant)
            valid = parse()
            rec.request_id = valid.request_id
            if self.cfg.log_prompts and valid.messages:
                rec.task_excerpt = excerpt(valid.messages[-1].content)
            priority = rec.priority = self._scheduling_class(principal, valid.priority)
            model = rec.model = self._admit_model(principal, valid)
            max_tokens = valid.sampling.max_tokens
            if valid.supersede_key:
                holder = self.supersession.take(principal.tenant, valid.supersede_key)

            if self.sessions is not None and self.sessions.applies(valid):
                turn = await self._session_turn(principal, valid, model)
                valid.messages = turn.messages  # the stored history around this turn
                valid.estimated_prompt_tokens = estimate_prompt_tokens(turn.messages)
                rec.session_turns_dropped = turn.dropped
            # A raw prompt (text completions) counts like one message for quota, affinity and placement.
            texts = valid.messages or [wpb.ChatMessage(role="user", content=valid.prompt + valid.suffix)]
            if self.cache is not None and (key := self.cache.key(principal.tenant, model, valid, texts)):
                hit, flight = await self.cache.lookup(key, model, deadline)
                rec.cache = "miss"
                if hit is not None:
                    rec.cache, rec.pool, rec.worker = "hit", "cache", "cache"
                    settle_as = self._hit_charge(model, hit)
                    reservation = await self._reserve(principal, *settle_as)
                    events = self._replay(hit, valid, turn, rec, settle_as[1])
                    for ev in events[:-1]:
                        yield ev
                    if turn is not None:
                        turn.answer.append(hit.text)
                        await self._commit_turn(turn, hit.prompt_tokens, hit.completion_tokens)
                    yield events[-1]
                    return
            trace.begin("igw.queue")
            reservation = await self._reserve(
                principal,
                prompt_token_bound(texts) + max_tokens,
                self.pricing.cost(model, prompt_token_bound(texts), max_tokens),
            )
            estimate = valid.estimated_prompt_tokens + max_tokens
            stream = RequestStream(
                max_tokens, estimate, retries=self.cfg.queue.retry_before_first_token, itl_observer=m.itl.labels(model)
            )
            if holder is not None:
                holder.stream = stream
            sticky = principal.tenant if self.cfg.pool_affinity == "tenant" else valid.session_id or principal.tenant
            ticket = Ticket(
                model=model,
                tenant=principal.tenant,
                priority=priority,
                cost_tokens=estimate,
                affinity=affinity_key(principal.tenant, valid.session_id, texts),
                pool=self.placement.choose_pool(model, sticky),
            )
            interval_ms = (
                valid.stream_interval_ms if valid.stream_interval_ms is not None else self.cfg.stream_interval_ms
            )
            job = Job(
                model=model,
                messages=valid.messages,
                sampling=valid.sampling,
                deadline=deadline,
                prompt=valid.prompt,
                suffix=valid.suffix,
                stream_interval_ms=interval_ms,
            )
            started_sent = first_token = False
            interval = interval_ms / 1000
            while True:  # once, plus once per retry after a worker failed before answering
                if holder is not None:
                    if holder.superseded:
                        raise Superseded()
                    holder.ticket = ticket
                claim = await self._wait_for_worker(ticket, deadline, loop)
                if holder is not None and holder.superseded:
                    raise Superseded()
                worker = claim.conn
                if stream.dispatched_at is None:
                    m.queue_wait.labels(model, priority).observe(time.monotonic() - stream.created)
                trace.begin("igw.dispatch", worker=worker.name)
                rec.pool, rec.worker = worker.pool, worker.name
                job.trace_context = trace.carrier()
                worker.open(stream, claim, job)
                claim = None  # the stream holds it now, until it ends
                while True:
                    update = await stream.next()
                    if update.accepted_prompt_tokens is not None:
                        # The real prompt is known: hold only prompt + max_tokens from now on.
                        accepted = update.accepted_prompt_tokens
                        self.quotas.trim(
                            reservation, accepted + max_tokens, self.pricing.cost(model, accepted, max_tokens)
                        )
                        if not started_sent:
                            started_sent = True
                            yield Started(
                                valid.request_id,
                                model,
                                stream.worker_name,
                                accepted,
                                turn.history_turns if turn else 0,
                                turn.dropped if turn else 0,
                            )
                    elif update.retry_from is not None:
                        log.warning(
                            "request %s: worker %s failed before the first token; retrying elsewhere",
                            rec.id,
                            update.retry_from.name,
                        )
                        m.retries.inc()
                        ticket = dataclasses.replace(
                            ticket,
                            exclude=ticket.exclude | {update.retry_from},
                            granted=loop.create_future(),
                            pool="",  # any pool now
                            enqueued_at=time.monotonic(),
                        )
                        stream.resume()
                        break
                    elif update.error is not None:
                        code, message, field = update.error
                        if code == grpc.StatusCode.INVALID_ARGUMENT and field:
                            raise invalid_argument(field, message)
                        if holder is not None and holder.superseded:
                            raise Superseded()
                        # Usage so far rides in the trailers, e.g. for a stream cut by a dead worker.
                        raise RpcError(code, message, trailers=_usage_trailers(stream))
                    elif update.finish_reason is not None:
                        rec.finish_reason = update.finish_reason
                        trace.event("finish", finish_reason=update.finish_reason)
                        if flight is not None:
                            await flight.finish(
                                model, stream.prompt_tokens, stream.completion_tokens, rec.finish_reason
                            )
                        if turn is not None:
                            await self._commit_turn(turn, stream.prompt_tokens, stream.completion_tokens)
                        yield Done(
                            update.finish_reason,
                            stream.prompt_tokens,
                            stream.completion_tokens,
                            stream.ms_since_created(stream.dispatched_at),
                            stream.ms_since_created(stream.first_token_at),
                            stream.ms_since_created(None),
                            self.pricing.cost(model, stream.prompt_tokens, stream.completion_tokens),
                        )
                        return
                    else:
                        if not first_token:
                            first_token = True
                            m.ttft.labels(model, rec.pool).observe(
                                (stream.first_token_at or time.monotonic()) - stream.created
                            )
                            trace.event("first_token")
                            trace.begin("igw.generate")
                        if flight is not None:
                            flight.add(update.text, update.tokens)
                        if turn is not None:
                            turn.answer.append(update.text)
                        yield Delta(update.text, update.tokens)
                        if interval and not worker.paces_deltas:  # let the next steps merge into one message
                            await self.pacer.after_send(interval, stream, loop.time())
        except Superseded:
            err = superseded(_usage_trailers(stream) if stream is not None else ())
            rec.code, rec.reason = err.code, err.reason
            m.superseded.inc()
            raise err from None
        except RpcError as err:
            rec.code, rec.reason = err.code, err.reason
            raise
        except (asyncio.CancelledError, GeneratorExit):
            rec.code = (
                grpc.StatusCode.DEADLINE_EXCEEDED
                if deadline is not None and loop.time() >= deadline
                else grpc.StatusCode.CANCELLED
            )
            raise
        except Exception:
            rec.code = grpc.StatusCode.INTERNAL  # a bug: the log has the traceback
            log.exception("request %s failed", rec.id)
            raise RpcError(
                grpc.StatusCode.INTERNAL,
                f"the gateway failed on this request (id {rec.id} in its log); retrying may help",
            ) from None
        finally:
            # The one abort path: client gone, deadline passed, superseded, or we failed mid-way.
            if holder is not None:
                self.supersession.release(holder)
            if flight is not None:
                flight.release()  # not stored (failed or cancelled): an identical request waiting generates
            if claim is not None:
                claim.release()
            if stream is not None and stream.worker is not None and not stream.finished:
                stream.worker.cancel(
                    stream, "deadline" if rec.code == grpc.StatusCode.DEADLINE_EXCEEDED else "cancelled"
                )
            if settle_as is not None:
                rec.cost_micros = settle_as[1]
            elif stream is not None:
                rec.cost_micros = self.pricing.cost(rec.model, stream.prompt_tokens, stream.completion_tokens)
            if reservation is not None:
                used = settle_as[0] if settle_as else stream.prompt_tokens + stream.completion_tokens if stream else 0
                self.quotas.settle(reservation, used, rec.cost_micros)
            m.active_streams.dec()
            self._account(rec, stream)
            trace.finish(rec)

    def _account(self, rec: RequestRecord, stream: RequestStream | None) -> None:
        """The counters of a finished request (the histograms were observed as things happened)."""
        m, label = self.metrics, rec.tenant_label
        m.requests.labels(rec.model, label, rec.code.name, rec.pool).inc()
        if rec.reason and (stream is None or stream.dispatched_at is None):
            m.rejections.labels(rec.reason, label).inc()
        if stream is not None:
            m.duration.labels(rec.model, rec.pool).observe(time.monotonic() - stream.created)
            m.tokens.labels(label, rec.model, "input").inc(stream.prompt_tokens)
            m.tokens.labels(label, rec.model, "output").inc(stream.completion_tokens)
        if rec.cost_micros:
            m.cost.labels(label, rec.model).inc(rec.cost_micros / MICROS)
        rec.log_line(stream)

    # --- sessions and the response cache -----------------------------------------------------------

    async def _session_turn(self, principal: Principal, valid: ValidRequest, model: str) -> ActiveTurn:
        try:
            return await self.sessions.begin(principal.tenant, valid, self.workers.max_context_tokens(model))
        except StateUnavailable as err:
            self.metrics.state_store_failures.labels("sessions").inc()
            log.warning("session store unavailable: %s", err)
            raise unavailable(
                "the session store is unreachable, so this turn was not run; retry shortly", 1.0, reason="session_store"
            ) from None

    async def _commit_turn(self, turn: ActiveTurn, prompt_tokens: int, completion_tokens: int) -> None:
        """Write a finished turn before its ``done`` goes out, so the next turn sees it."""
        try:
            await self.sessions.commit(turn, prompt_tokens, completion_tokens)
        except StateUnavailable as err:
            self.metrics.state_store_failures.labels("sessions").inc()
            log.warning("session store unavailable: %s", err)
            raise unavailable(
                "the answer is complete but the session store did not save this turn: the session is as it was "
                "before it; send the turn again",
                1.0,
                reason="session_store",
            ) from None

    def _hit_charge(self, model: str, hit: Entry) -> tuple[int, int]:
        """(tokens, cost) a cache hit is charged: gateway.cache.hit_charge."""
        if self.cfg.cache.hit_charge == "full":
            return hit.prompt_tokens + hit.completion_tokens, self.pricing.cost(
                model, hit.prompt_tokens, hit.completion_tokens
            )
        return 0, 0

    def _replay(self, hit: Entry, valid: ValidRequest, turn: ActiveTurn | None, rec: RequestRecord, cost: int):
        """The events of a cache hit: started, the deltas as they were stored, done."""
        rec.finish_reason, rec.usage = hit.finish_reason, (hit.prompt_tokens, hit.completion_tokens)
        elapsed = lambda: max(0, round((time.monotonic() - rec.started) * 1000))  # noqa: E731
        events: list[Event] = [
            Started(
                valid.request_id,
                hit.model,
                "cache",
                hit.prompt_tokens,
                turn.history_turns if turn else 0,
                turn.dropped if turn else 0,
                cache_hit=True,
            )
        ]
        events += [Delta(text, tokens) for text, tokens in hit.pieces]
        ttft = elapsed()
        self.metrics.ttft.labels(hit.model, "cache").observe(ttft / 1000)
        events.append(
            Done(
                hit.finish_reason,
                hit.prompt_tokens,
                hit.completion_tokens,
                0,
                ttft,
                elapsed(),
                cost,
                cache_hit=True,
            )
        )
        return events

    async def _wait_for_worker(self, ticket: Ticket, deadline: float | None, loop) -> Claim:
        """Queue until a worker has room. Cancel or deadline while queued: out of the queue at once."""
        if not self.workers.can_serve(ticket.model, ticket.exclude):
            raise self.workers.no_worker_error(ticket.model)
        try:
            return await self.scheduler.wait(ticket, deadline - loop.time() if deadline is not None else None)
        except QueueFull:
            raise resource_exhausted(
                f"the gateway's queue is full ({self.scheduler.max_queued} requests waiting)",
                1.0,
                [("gateway:queue", "admission queue full")],
                reason="queue_full",
            ) from None
        except TimeoutError:
            raise deadline_exceeded(
                "the deadline passed while the request waited for a worker; it never started"
            ) from None

    def budgets(self, principal: Principal) -> list[Budget]:
        """The quota budgets a caller is subject to: its key's (if any) and its tenant's."""
        budgets = []
        if principal.key_id:
            limits = principal.key_limits
            if limits == NO_LIMITS:
                limits = self.cfg.quota.default_key_limits
            budgets.append(Budget("key", principal.key_id, limits, principal.tenant, self.pricing.currency))
        limits = principal.tenant_limits
        if limits == NO_LIMITS:
            limits = self.cfg.quota.default_tenant_limits
        budgets.append(Budget("tenant", principal.tenant, limits, principal.tenant, self.pricing.currency))
        return budgets

    async def _reserve(self, principal: Principal, tokens: int, cost: int = 0):
        try:
            return await self.quotas.reserve(self.budgets(principal), tokens, cost)
        except Denied as denied:
            raise resource_exhausted(
                f"quota exceeded: {denied}",
                denied.retry_after_s,
                [(v.budget.subject, v.description) for v in denied.violations],
                reason="quota_" + denied.violations[0].kind,
            ) from None
        except StoreUnavailable:
            raise unavailable(
                "the quota store is unreachable and this gateway fails closed; retry shortly", 1.0, reason="quota_store"
            ) from None

    @staticmethod
    def _scheduling_class(principal: Principal, asked: str | None) -> str:
        """The class asked for, or the key's cap when unset; above the cap is PERMISSION_DENIED."""
        if asked is None:
            return principal.priority_max
        if not priority_allowed(asked, principal.priority_max):
            cap = principal.priority_max
            raise permission_denied(f"priority: this API key may only send {cap} requests (its priority_max is {cap})")
        return asked

    def _admit_model(self, principal: Principal, valid: ValidRequest) -> str:
        """The model that serves the request: one the worker set serves, the caller may use, and whose
        context window leaves room for a prompt next to max_tokens."""
        models = self.workers.models()
        model = valid.model or self.workers.default_model()
        if model not in models:
            if not model or not self.workers.all_reached():
                # A worker we never reached might serve it: do not claim it does not exist.
                raise self.workers.no_worker_error(model)
            raise model_not_found(model, sorted(models))
        if not models[model]:
            raise self.workers.no_worker_error(model)
        if not principal.may_use(model):
            who = f"API key {principal.key_id}" if principal.key_id else f"tenant {principal.tenant}"
            raise permission_denied(
                f"model: {who} may not use model {model!r}; it may use {', '.join(sorted(principal.models))}"
            )
        if valid.suffix and not self.workers.fill_in_middle(model):
            raise invalid_argument(
                "suffix", f"model {model} has no fill-in-the-middle tokens; send the prompt without a suffix"
            )
        window = self.workers.max_context_tokens(model)
        max_tokens = valid.sampling.max_tokens
        if max_tokens >= window:
            source = "sampling.max_tokens" if valid.max_tokens_was_set else "gateway.limits.default_max_tokens (config)"
            raise invalid_argument(
                "sampling.max_tokens",
                f"{max_tokens} tokens leaves no room for the prompt in model {model}'s {window}-token context "
                f"(from {source}); ask for fewer",
            )
        return model
