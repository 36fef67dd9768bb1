"""One request's walk through the core, as the methods of a ``Run``, in the order it takes them:

    admit    authenticate, validate (the one validator), scheduling class, model, supersede key
    recall   server-side sessions: the stored history goes around this turn
    cache    a hit replays a stored answer instead of queueing
    reserve  quota and spend: one request + a prompt bound + max_tokens, atomically
    queue    wait for a worker with room (``scheduler``), in priority and fairness order
    place    open the request on the claimed worker (``placement`` chose the pool and worker)
    relay    the worker's updates become the door's events: started, deltas, done
    settle   the one place that gives everything back: the worker's room, a cancel on the worker,
             the quota (refunding what was not used), the supersede key, the cache flight;
             then metrics, one log line and the spans

Whatever ends a request early (client cancel or disconnect, deadline, supersession, an error) passes
through ``settle``, which cancels it on the worker (vLLM aborts it within one engine step).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from gateway.core import admission
from gateway.core.auth import Principal
from gateway.core.events import Delta, Done, Event, Started
from gateway.core.placement import affinity_key
from gateway.core.scheduler import QueueFull, Ticket
from gateway.core.supersession import Holder, Superseded
from gateway.core.validation import validate
from gateway.errors import (
    RpcError,
    deadline_exceeded,
    field_error,
    invalid_argument,
    resource_exhausted,
    superseded,
    unavailable,
)
from gateway.observe import RequestRecord, excerpt, request_trace
from gateway.request import RequestDraft, ValidRequest, estimate_prompt_tokens
from gateway.state.cache import Entry, Flight
from gateway.state.quota import MICROS, prompt_token_bound
from gateway.state.redis import StateUnavailable
from gateway.state.sessions import ActiveTurn, TurnConflict, TurnMissing, TurnNotLatest
from gateway.workers.connection import Claim, Job
from gateway.workers.streaming import RequestStream, Update
from igw_worker_api.v1 import worker_pb2 as wpb

if TYPE_CHECKING:
    from gateway.core.request_core import RequestCore

log = logging.getLogger("gateway.core.run")


def _usage_trailers(stream: RequestStream | None) -> tuple:
    if stream is None:
        return ()
    return (("igw-prompt-tokens", str(stream.prompt_tokens)), ("igw-completion-tokens", str(stream.completion_tokens)))


class Run:
    """One request from admission to settlement. Made by ``RequestCore.run``; used once."""

    def __init__(self, core: RequestCore, headers, deadline: float | None, door: str):
        self.core, self.headers, self.deadline = core, headers, deadline
        self.loop = asyncio.get_running_loop()
        self.rec = RequestRecord(door=door)
        self.trace = request_trace(core.tracer, headers)
        self.principal: Principal | None = None
        self.valid: ValidRequest | None = None
        self.model = self.priority = ""
        # What the run holds, each given back by settle():
        self.holder: Holder | None = None  # the supersede key
        self.turn: ActiveTurn | None = None  # the session turn being written
        self.flight: Flight | None = None  # the cache's single flight of this answer
        self.reservation = None  # quota and spend
        self.settle_as: tuple[int, int] | None = None  # (tokens, cost) a cache hit is charged
        self.stream: RequestStream | None = None  # the worker's updates (holds the worker's room)
        self.claim: Claim | None = None  # the worker's room, between grant and open
        self.worker = None  # the connection the request was last opened on
        self.ticket: Ticket | None = None
        self.job: Job | None = None
        self.started_sent = self.first_token = False
        self.done_sent = False  # a door that stops reading after Done closes us: that is success

    async def events(self, reading: RequestDraft | RpcError, principal: Principal | None) -> AsyncIterator[Event]:
        """The request's events for its door. ``reading``: the door's draft, or the error its wire format
        met (raised after authentication, so an unauthenticated caller learns nothing of the body)."""
        self.core.metrics.active_streams.inc()
        try:
            self.admit(reading, principal)
            await self.recall()
            hit = await self.cached()
            if hit is not None:
                async with contextlib.aclosing(self.replay(hit)) as replayed:
                    async for ev in replayed:
                        yield ev
                return
            await self.reserve()
            while True:  # once, plus once per retry after a worker failed before answering
                await self.queue()
                self.place()
                while (ev := await self.relay()) is not None:
                    yield ev
                    if isinstance(ev, Done):
                        return
                    if isinstance(ev, Delta):
                        await self.pace()
        except BaseException as exc:
            raise self.ended_by(exc) from None
        finally:
            self.settle()

    # --- admit ----------------------------------------------------------------------------------

    def admit(self, reading: RequestDraft | RpcError, principal: Principal | None) -> None:
        core, rec = self.core, self.rec
        with self.trace.span("igw.auth"):
            self.principal = principal = principal or core.auth.authenticate(self.headers)
        rec.tenant, rec.key_id = principal.tenant, principal.key_id
        rec.tenant_label = core.auth.tenant_label(principal.tenant)
        if isinstance(reading, RpcError):
            raise reading
        self.valid = valid = validate(reading, core.cfg.limits)
        rec.request_id = valid.request_id
        if core.cfg.log_prompts and valid.messages:
            rec.task_excerpt = excerpt(valid.messages[-1].content)
        self.priority = rec.priority = admission.scheduling_class(principal, valid.priority)
        self.model = rec.model = admission.admit_model(core.workers, principal, valid)
        window = core.workers.max_context_tokens(self.model)
        if valid.sampling.fit_context and valid.sampling.max_tokens >= window:
            # A ceiling over the whole context: what the smallest prompt leaves (the worker lowers it further).
            sampling = wpb.Sampling()
            sampling.CopyFrom(valid.sampling)
            sampling.max_tokens = window - 1
            self.valid = valid = dataclasses.replace(valid, sampling=sampling)
        if valid.supersede_key:
            self.holder = core.supersession.take(principal.tenant, valid.supersede_key)

    # --- sessions and the response cache ----------------------------------------------------------

    async def recall(self) -> None:
        """A session's stored history goes around this turn (a new request value, not a change)."""
        sessions, valid = self.core.sessions, self.valid
        if sessions is None and valid.session_follows >= 0:
            raise RpcError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "server-side sessions are off on this gateway (gateway.sessions.enabled), so no turn is stored "
                "to continue: send the whole conversation",
                reason="sessions_off",
            )
        if sessions is None or not sessions.applies(valid):
            return
        try:
            self.turn = await sessions.begin(
                self.principal.tenant, valid, self.core.workers.max_context_tokens(self.model)
            )
        except StateUnavailable as err:
            raise self._session_store_down(
                err, "the session store is unreachable, so this turn was not run; retry shortly"
            ) from None
        except TurnMissing:
            raise field_error(
                grpc.StatusCode.NOT_FOUND,
                "session_follows",
                "no such turn in this caller's session (never stored, trimmed, expired, deleted or another tenant's)",
                "session_turn_not_found",
            ) from None
        except TurnNotLatest:
            raise field_error(
                grpc.StatusCode.FAILED_PRECONDITION,
                "session_follows",
                "the conversation went on after this turn; only its latest turn can be continued",
                "session_turn_not_latest",
            ) from None
        self.turn.model = self.model
        messages = tuple(self.turn.messages)
        self.valid = dataclasses.replace(
            valid, messages=messages, estimated_prompt_tokens=estimate_prompt_tokens(messages, valid.tools_bytes())
        )
        self.rec.session_turns_dropped = self.turn.dropped

    async def remember(self, prompt_tokens: int, completion_tokens: int, finish_reason: str) -> None:
        """Write a finished turn before its ``done`` goes out, so the next turn sees it."""
        if self.turn is None or not self.valid.session_store:
            return
        try:
            await self.core.sessions.commit(self.turn, prompt_tokens, completion_tokens, finish_reason)
        except TurnConflict:
            raise RpcError(
                grpc.StatusCode.ABORTED,
                "another turn continued the same turn of this session while this one ran: this one was not "
                "stored (the session has the other); continue from that one",
                reason="session_conflict",
            ) from None
        except StateUnavailable as err:
            raise self._session_store_down(
                err,
                "the answer is complete but the session store did not save this turn: the session is as it was "
                "before it; send the turn again",
            ) from None

    def _session_store_down(self, err: StateUnavailable, message: str) -> RpcError:
        self.core.metrics.state_store_failures.labels("sessions").inc()
        log.warning("session store unavailable: %s", err)
        return unavailable(message, 1.0, reason="session_store")

    async def cached(self) -> Entry | None:
        """A stored answer to replay, or None (a miss joins or leads the cache's single flight)."""
        cache = self.core.cache
        if cache is None:
            return None
        key = cache.key(self.principal.tenant, self.model, self.valid, self.valid.prompt_texts())
        if not key:
            return None
        hit, self.flight = await cache.lookup(key, self.model, self.deadline)
        self.rec.cache = "miss" if hit is None else "hit"
        return hit

    async def replay(self, hit: Entry) -> AsyncIterator[Event]:
        """A cache hit's events: started, the deltas as they were stored, done; charged per hit_charge."""
        core, rec = self.core, self.rec
        rec.pool = rec.worker = "cache"
        rec.finish_reason, rec.usage = hit.finish_reason, (hit.prompt_tokens, hit.completion_tokens)
        if core.cfg.cache.hit_charge == "full":
            self.settle_as = (hit.prompt_tokens + hit.completion_tokens, core.pricing.cost(self.model, *rec.usage))
        else:
            self.settle_as = (0, 0)
        self.reservation = await admission.reserve(core.quotas, core.budgets(self.principal), *self.settle_as)
        ttft = self._elapsed_ms()  # the answer is all here: its first token is as early as its last
        core.metrics.ttft.labels(hit.model, "cache").observe(ttft / 1000)
        done = Done(hit.finish_reason, *rec.usage, 0, ttft, self._elapsed_ms(), self.settle_as[1], True)
        yield self._started(hit.model, "cache", hit.prompt_tokens, cache_hit=True)
        for text, tokens in hit.pieces:
            yield Delta(text, tokens)
        if self.turn is not None:
            self.turn.answer.append(hit.text)
        await self.remember(hit.prompt_tokens, hit.completion_tokens, hit.finish_reason)
        self.done_sent = True
        yield done

    def _elapsed_ms(self) -> int:
        return max(0, round((time.monotonic() - self.rec.started) * 1000))

    # --- reserve, queue, place ------------------------------------------------------------------

    async def reserve(self) -> None:
        """Quota for the worst case (a prompt bound + max_tokens), then what the run will need to queue."""
        core, valid = self.core, self.valid
        self.trace.begin("igw.queue")
        max_tokens, texts = valid.sampling.max_tokens, valid.prompt_texts()
        bound = prompt_token_bound(texts, valid.tools_bytes())
        # It may burst to an overflow pool: reserve at the dearest price of the pools it may reach.
        bursts = any(p.overflow for p in core.cfg.pools) and core.cfg.overflow.allows(self.principal.tenant, self.model)
        priced = [p.name for p in core.cfg.pools if p.price is not None and (bursts or not p.overflow)]
        cost = core.pricing.most(self.model, bound, max_tokens, priced)
        self.reservation = await admission.reserve(core.quotas, core.budgets(self.principal), bound + max_tokens, cost)
        estimate = valid.estimated_prompt_tokens + max_tokens
        # A constraint's or tools' decoding state cannot be carried to another worker: those are not resumed.
        resumable = valid.constraint is None and valid.tools is None
        self.stream = RequestStream(
            max_tokens,
            estimate,
            retries=core.cfg.queue.retry_before_first_token,
            itl_observer=core.metrics.itl.labels(self.model),
            resumes=core.cfg.queue.resume_after_first_token if resumable else 0,
        )
        if self.holder is not None:
            self.holder.stream = self.stream
        tenant = self.principal.tenant
        # An agent's own conversation id first: a Responses conversation the gateway stores has a session id
        # it made, which must not take that agent's turns off the worker that holds their prefix.
        sticky = tenant if core.cfg.pool_affinity == "tenant" else valid.affinity_id or valid.session_id or tenant
        self.ticket = Ticket(
            model=self.model,
            tenant=tenant,
            priority=self.priority,
            cost_tokens=estimate,
            prompt_tokens=valid.estimated_prompt_tokens,
            affinity=affinity_key(tenant, valid.affinity_id or valid.session_id, texts),
            pool=core.placement.choose_pool(self.model, sticky),
            overflow_after_s=core.cfg.overflow.after_queue_ms / 1000 if bursts else None,
        )
        self.job = Job(
            model=self.model,
            messages=valid.messages,
            sampling=valid.sampling,
            deadline=self.deadline,
            prompt=valid.prompt,
            suffix=valid.suffix,
            stream_interval_ms=self.interval_ms,
            constraint=valid.constraint,
            tools=valid.tools,
            report_token_ids=self.stream.resumes_left > 0,
        )
        prompt, ids = await core.placement.prompt_blocks(self.model, self.job)
        if prompt is not None:
            # Counted, not estimated: the worker's room is claimed for what the prompt really takes.
            self.ticket.prompt, self.ticket.cost_tokens = prompt, prompt.tokens + max_tokens
            self.stream.cost_tokens = self.ticket.cost_tokens
            self.job = dataclasses.replace(self.job, prompt_token_ids=tuple(ids))

    @property
    def interval_ms(self) -> int:
        asked = self.valid.stream_interval_ms
        return asked if asked is not None else self.core.cfg.stream_interval_ms

    async def queue(self) -> None:
        """Wait until a worker has room. Cancel or deadline while queued: out of the queue at once."""
        core, ticket = self.core, self.ticket
        self._check_superseded()
        if self.holder is not None:
            self.holder.ticket = ticket
        if not core.workers.can_serve(ticket.model, ticket.exclude, overflow=ticket.overflow_after_s is not None):
            raise core.workers.no_worker_error(ticket.model)
        timeout = self.deadline - self.loop.time() if self.deadline is not None else None
        try:
            self.claim = await core.scheduler.wait(ticket, timeout)
        except QueueFull:
            raise resource_exhausted(
                f"the gateway's queue is full ({core.scheduler.max_queued} requests waiting)",
                1.0,
                [("gateway:queue", "admission queue full")],
                reason="queue_full",
            ) from None
        except TimeoutError:
            raise deadline_exceeded(
                "the deadline passed while the request waited for a worker; it never started"
            ) from None
        self._check_superseded()

    def place(self) -> None:
        """Open the request on the claimed worker; from here the stream holds the worker's room."""
        stream, worker = self.stream, self.claim.conn
        if stream.dispatched_at is None:
            self.core.metrics.queue_wait.labels(self.model, self.priority).observe(time.monotonic() - stream.created)
        self.trace.begin("igw.dispatch", worker=worker.name)
        self.rec.pool, self.rec.worker = worker.pool, worker.name
        self.job.trace_context = self.trace.carrier()
        self.worker = worker
        worker.open(stream, self.claim, self.job)
        self.claim = None

    def _check_superseded(self) -> None:
        if self.holder is not None and self.holder.superseded:
            raise Superseded()

    # --- relay ----------------------------------------------------------------------------------

    async def relay(self) -> Event | None:
        """The next event for the door, or None when the request must go to another worker."""
        while True:
            update = await self.stream.next()
            if update.accepted_prompt_tokens is not None:
                if (started := self._accepted(update.accepted_prompt_tokens)) is not None:
                    return started
            elif update.retry_from is not None:
                self._retry(update.retry_from)
                return None
            elif update.resume_from is not None:
                self._resume(update.resume_from)
                return None
            elif update.error is not None:
                raise self._worker_error(*update.error)
            elif update.finish_reason is not None:
                return await self._finished(update.finish_reason)
            else:
                return self._delta(update)

    def _accepted(self, prompt_tokens: int) -> Started | None:
        """The real prompt is known: hold only prompt + max_tokens of quota from now on."""
        core, max_tokens = self.core, self.valid.sampling.max_tokens
        if self.valid.sampling.fit_context:  # the worker lowered the ceiling to what the context leaves
            max_tokens = max(1, min(max_tokens, core.workers.max_context_tokens(self.model) - prompt_tokens))
        cost = core.pricing.cost(self.model, prompt_tokens, max_tokens, self.rec.pool)
        core.quotas.trim(self.reservation, prompt_tokens + max_tokens, cost)
        if self.started_sent:
            return None
        self.started_sent = True
        return self._started(self.model, self.stream.worker_name, prompt_tokens)

    def _started(self, model: str, worker: str, prompt_tokens: int, cache_hit: bool = False) -> Started:
        turn = self.turn
        return Started(
            self.valid.request_id,
            model,
            worker,
            prompt_tokens,
            turn.history_turns if turn else 0,
            turn.dropped if turn else 0,
            cache_hit=cache_hit,
            session_turn=turn.number if turn and self.valid.session_store else -1,
        )

    def _retry(self, failed) -> None:
        """The worker failed before answering: queue again for any other worker, in any pool."""
        log.warning("request %s: worker %s failed before the first token; retrying elsewhere", self.rec.id, failed.name)
        self.core.metrics.retries.inc()
        self._retry_elsewhere(failed)

    def _retry_elsewhere(self, failed) -> None:
        """Queue again for any worker but ``failed``, in any pool."""
        ticket = self.ticket
        self.ticket = dataclasses.replace(
            ticket,
            exclude=ticket.exclude | {failed},
            granted=self.loop.create_future(),
            pool="",
            enqueued_at=time.monotonic(),
        )
        self.stream.resume()

    def _resume(self, failed) -> None:
        """The worker was lost mid-answer: continue on another worker from the tokens already sent, as
        token ids (greedy output is unchanged), for the tokens still to make; usage stays one request's."""
        stream, job, core = self.stream, self.job, self.core
        sent = stream.completion_tokens
        bursts = self.ticket.overflow_after_s is not None
        if not core.workers.can_serve(self.model, self.ticket.exclude | {failed}, overflow=bursts):
            raise self._worker_error(
                grpc.StatusCode.UNAVAILABLE,
                f"the worker serving this request became unavailable and no other can continue it; the stream "
                f"was cut after {sent} tokens and is incomplete",
                "",
            )
        log.warning(
            "request %s: worker %s lost after %d tokens; resuming on another worker", self.rec.id, failed.name, sent
        )
        core.metrics.resumes.inc()
        self.rec.resumes += 1
        sampling = wpb.Sampling()
        sampling.CopyFrom(job.sampling)
        sampling.max_tokens = stream.max_tokens - sent
        self.job = dataclasses.replace(job, sampling=sampling, resume_token_ids=tuple(stream.token_ids))
        self._retry_elsewhere(failed)

    def _worker_error(self, code: grpc.StatusCode, message: str, field: str) -> BaseException:
        if code == grpc.StatusCode.INVALID_ARGUMENT and field:
            return invalid_argument(field, message)
        if self.holder is not None and self.holder.superseded:
            return Superseded()
        # Usage so far rides in the trailers, e.g. for a stream cut by a dead worker.
        return RpcError(code, message, trailers=_usage_trailers(self.stream))

    async def _finished(self, finish_reason: str) -> Done:
        stream = self.stream
        self.rec.finish_reason = finish_reason
        self.trace.event("finish", finish_reason=finish_reason)
        if self.flight is not None:
            await self.flight.finish(self.model, stream.prompt_tokens, stream.completion_tokens, finish_reason)
        await self.remember(stream.prompt_tokens, stream.completion_tokens, finish_reason)
        self.done_sent = True
        return Done(
            finish_reason,
            stream.prompt_tokens,
            stream.completion_tokens,
            stream.ms_since_created(stream.dispatched_at),
            stream.ms_since_created(stream.first_token_at),
            stream.ms_since_created(None),
            self.core.pricing.cost(self.model, stream.prompt_tokens, stream.completion_tokens, self.rec.pool),
            cached_prompt_tokens=stream.cached_prompt_tokens,
        )

    def _delta(self, update: Update) -> Delta:
        stream = self.stream
        if not self.first_token:
            self.first_token = True
            ttft = (stream.first_token_at or time.monotonic()) - stream.created
            self.core.metrics.ttft.labels(self.model, self.rec.pool).observe(ttft)
            self.trace.event("first_token")
            self.trace.begin("igw.generate")
        if self.flight is not None:
            if update.tool_calls:  # the cache keeps text only: an answer with calls is not stored
                self.flight.release()
                self.flight = None
            else:
                self.flight.add(update.text, update.tokens)
        if self.turn is not None:
            self.turn.answer.append(update.text)
            self.turn.add_calls(update.tool_calls)
        return Delta(update.text, update.tokens, update.tool_calls, stream.relayed)

    async def pace(self) -> None:
        """Let the next engine steps merge into one message (only for workers that do not pace)."""
        interval = self.interval_ms / 1000
        if interval and not self.worker.paces_deltas:
            await self.core.pacer.after_send(interval, self.stream, self.loop.time())

    # --- how it ended, and settle ----------------------------------------------------------------

    def ended_by(self, exc: BaseException) -> BaseException:
        """Record how the request ended; the exception its door sees."""
        rec = self.rec
        if isinstance(exc, Superseded):
            err = superseded(_usage_trailers(self.stream))
            rec.code, rec.reason = err.code, err.reason
            self.core.metrics.superseded.inc()
            return err
        if isinstance(exc, RpcError):
            rec.code, rec.reason = exc.code, exc.reason
            return exc
        if isinstance(exc, GeneratorExit) and self.done_sent:
            return exc  # the door closed us after reading Done: the request succeeded
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            past = self.deadline is not None and self.loop.time() >= self.deadline
            rec.code = grpc.StatusCode.DEADLINE_EXCEEDED if past else grpc.StatusCode.CANCELLED
            return exc
        if not isinstance(exc, Exception):
            return exc  # KeyboardInterrupt, SystemExit: not ours to translate
        rec.code = grpc.StatusCode.INTERNAL  # a bug: the log has the traceback
        log.error("request %s failed", rec.id, exc_info=exc)
        return RpcError(
            grpc.StatusCode.INTERNAL, f"the gateway failed on this request (id {rec.id} in its log); retrying may help"
        )

    def settle(self) -> None:
        """The one abort path and the one release: client gone, deadline passed, superseded, failed, or done."""
        core, rec, stream = self.core, self.rec, self.stream
        if self.holder is not None:
            core.supersession.release(self.holder)
        if self.flight is not None:
            self.flight.release()  # not stored (failed or cancelled): an identical request waiting generates
        if self.claim is not None:
            self.claim.release()
        if stream is not None and stream.worker is not None and not stream.finished:
            reason = "deadline" if rec.code == grpc.StatusCode.DEADLINE_EXCEEDED else "cancelled"
            stream.worker.cancel(stream, reason)
        if self.settle_as is not None:
            used, rec.cost_micros = self.settle_as
        else:
            used = stream.prompt_tokens + stream.completion_tokens if stream is not None else 0
            if stream is not None:
                rec.cost_micros = core.pricing.cost(rec.model, stream.prompt_tokens, stream.completion_tokens, rec.pool)
        if self.reservation is not None:
            core.quotas.settle(self.reservation, used, rec.cost_micros)
        core.metrics.active_streams.dec()
        self._account()
        self.trace.finish(rec)

    def _account(self) -> None:
        """The counters of a finished request (the histograms were observed as things happened)."""
        m, rec, stream = self.core.metrics, self.rec, self.stream
        label = rec.tenant_label
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
