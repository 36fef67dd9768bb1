"""One gateway's ``Session`` on a worker: its requests and its outgoing frames.

The gateway multiplexes its requests over one long-lived stream; each
request runs as a task driving the engine, and the session sends back one
frame per engine step holding the events of every request that step
advanced (see ``Session.frames``). A request with a stream interval
(``Submit.stream_interval_ms``) has its steps merged here, at the source:
its deltas wait for ticks of ``igw_common.pacing``'s clock, shared by all
requests with that interval, so they travel together in one frame per tick.

A request's faults stay its own: a prompt the template rejects or that does
not fit fails that request (``Failed``), an engine exception fails that
request, and rendering/tokenizing runs off the event loop so a long prompt
does not stall the frames of every other request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import AsyncIterator

from google.rpc import code_pb2

from igw_common import kv_blocks, pacing, tool_calls, tracing
from igw_worker_api.v1 import worker_pb2 as pb
from inference.engine import Engine, InvalidRequest, SamplingSpec
from inference.metrics import WorkerMetrics

log = logging.getLogger("inference.session")

_FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
}


class Counters:
    """Lifetime counters of this worker process (reported by the Load RPC)."""

    def __init__(self) -> None:
        self.requests_total = 0
        self.requests_aborted_total = 0
        self.completion_tokens_total = 0
        self.frames_sent_total = 0
        self.active_requests = 0


class Session:
    """One gateway connection: its requests and its outgoing frames."""

    def __init__(
        self,
        session_id: int,
        engine: Engine,
        counters: Counters,
        metrics: WorkerMetrics | None = None,
        tracer=None,
        render_pool: concurrent.futures.Executor | None = None,
    ):
        self.id = session_id
        self.tracer = tracer or tracing.tracer(None, "igw-worker")
        self.engine = engine
        self.counters = counters
        self.metrics = metrics
        self.render_pool = render_pool  # None: render on the loop (tests)
        self.abort_started: dict[str, float] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.abort_reasons: dict[str, str] = {}
        self._outbox: list[pb.Event] = []
        # The delta of each request waiting in the outbox: a step that comes before the frame holding it has
        # gone out (the gateway reads slower than the engine steps) is added to it, so the outbox holds at
        # most one delta per request, not one per step, and the gateway handles one event for those steps.
        self._unsent_deltas: dict[str, pb.TokenDelta] = {}
        # Pacing (Submit.stream_interval_ms): a request's delta that comes less than its interval after its
        # previous one is held here, still taking the steps that follow, until the next tick of that interval.
        self._intervals: dict[str, float] = {}  # seconds, only for requests that asked for one
        self._last_delta_at: dict[str, float] = {}  # when each paced request's last delta went out
        self._held: dict[str, pb.Event] = {}
        # tick (igw_common.pacing) -> the requests whose delta waits for it: one timer and one frame per tick.
        self._ticks: dict[tuple[float, int], list[str]] = {}
        self._wake = asyncio.Event()
        self._reader_done = False
        self._seq = 0
        # Prefix-cache changes not yet sent (the engine's KV events): merged until the next frame.
        self._kv: kv_blocks.Changes | None = None

    # --- incoming -----------------------------------------------------------

    async def read(self, messages: AsyncIterator[pb.GatewayMessage]) -> None:
        try:
            async for msg in messages:
                for sub in msg.submits:
                    self._submit(sub)
                for cancel in msg.cancels:
                    self.abort(cancel.request_id, "cancelled")
        finally:
            self._reader_done = True
            self._wake.set()

    def _submit(self, sub: pb.Submit) -> None:
        rid = sub.request_id
        if not rid or rid in self.tasks:
            # The gateway assigns unique ids; a repeat is a gateway bug. Refuse the newcomer without
            # touching the running request (whose id it is).
            log.error("session %d: request id %r is empty or already running; submit refused", self.id, rid[:40])
            return
        if sub.stream_interval_ms:
            self._intervals[rid] = min(sub.stream_interval_ms, pacing.MAX_STREAM_INTERVAL_MS) / 1000
        task = self.tasks[rid] = asyncio.create_task(self._run(sub), name=f"request {rid}")
        task.add_done_callback(lambda t: self._cancelled_unstarted(rid, t))

    def abort(self, request_id: str, reason: str) -> None:
        task = self.tasks.get(request_id)
        if task is not None and not task.done():
            self.abort_reasons.setdefault(request_id, reason)
            self.abort_started.setdefault(request_id, time.monotonic())
            task.cancel()

    def abort_all(self, reason: str) -> None:
        for rid in list(self.tasks):
            self.abort(rid, reason)

    # --- one request ----------------------------------------------------------

    async def _run(self, sub: pb.Submit) -> None:
        # Continue the gateway's trace (W3C traceparent in Submit.trace_context).
        with self.tracer.start_as_current_span(
            "igw.worker.request", context=tracing.extract(sub.trace_context), kind=tracing.SpanKind.SERVER
        ) as span:
            span.set_attribute("igw.request_id", sub.request_id)
            await self._run_traced(sub, span)

    async def _prepare(self, sub: pb.Submit, sampling: SamplingSpec):
        """Render and tokenize the prompt and check it fits: off the event loop (a long prompt
        takes milliseconds of CPU that every other request's frames would otherwise wait for)."""

        def work():
            if sub.prompt or sub.suffix:
                prompt = self.engine.render_raw(sub.prompt, sub.suffix)
            else:
                prompt = self.engine.render(
                    *tool_calls.conversation(sub.messages, sampling.tools, self.engine.renders_tools)
                )
            if sub.resume_token_ids:
                prompt = prompt.resumed(sub.resume_token_ids)
            fitted = self.engine.fit(prompt, sampling)
            self.engine.check(prompt, fitted)
            return prompt, fitted

        if self.render_pool is None:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self.render_pool, work)

    async def _run_traced(self, sub: pb.Submit, span) -> None:
        rid = sub.request_id
        completion = cached = 0
        self.counters.requests_total += 1
        self.counters.active_requests += 1
        try:
            timeout = sub.timeout_ms / 1000 if sub.timeout_ms else None
            async with asyncio.timeout(timeout):
                if sub.model != self.engine.model:
                    raise InvalidRequest("model", f"this worker serves {self.engine.model!r}, not {sub.model[:64]!r}")
                s = sub.sampling
                tools = _tools(sub)
                grammar = tool_calls.forced_grammar(tools) if tools is not None else None
                sampling = SamplingSpec(
                    max_tokens=s.max_tokens,
                    temperature=s.temperature if s.HasField("temperature") else None,
                    top_p=s.top_p if s.HasField("top_p") else None,
                    stop=tuple(s.stop),
                    seed=s.seed if s.HasField("seed") else None,
                    constraint=("grammar", grammar)
                    if grammar
                    else _constraint(sub)
                    if sub.HasField("constraint")
                    else None,
                    tools=tools,
                    fit_context=s.fit_context,
                )
                parser = self.engine.tool_parser(tools) if tools is not None and tools.parses else None
                if sampling.max_tokens <= 0:
                    raise InvalidRequest("sampling.max_tokens", "max_tokens must be > 0")
                if sub.resume_token_ids and (sampling.constraint is not None or tools is not None):
                    raise InvalidRequest("resume_token_ids", "a request with a constraint or tools cannot be resumed")
                ids = sub.report_token_ids
                prompt, sampling = await self._prepare(sub, sampling)
                self._emit(pb.Event(request_id=rid, accepted=pb.Accepted(prompt_tokens=prompt.rendered_tokens)))
                # Engine request ids must be unique across sessions.
                async for step in self.engine.generate(f"s{self.id}-{rid}", prompt, sampling):
                    cached = max(cached, step.cached_tokens)
                    completion += step.tokens
                    self.counters.completion_tokens_total += step.tokens
                    text, calls = parser.feed(step.text, step.token_ids) if parser else (step.text, ())
                    finish_reason = step.finish_reason
                    if finish_reason is not None and parser is not None:
                        rest, more = parser.finish()
                        text, calls = text + rest, [*calls, *more]
                        if parser.called and finish_reason == "stop":
                            finish_reason = "tool_calls"
                    if step.tokens or text or calls:
                        self._emit_delta(rid, text, step.tokens, calls, step.token_ids if ids else ())
                    if finish_reason is not None:
                        span.set_attribute("gen_ai.usage.input_tokens", prompt.rendered_tokens)
                        span.set_attribute("gen_ai.usage.output_tokens", completion)
                        self._emit_end(
                            pb.Event(
                                request_id=rid,
                                finished=pb.Finished(
                                    finish_reason=_FINISH[finish_reason],
                                    prompt_tokens=prompt.rendered_tokens,
                                    completion_tokens=completion,
                                    cached_prompt_tokens=min(cached, prompt.rendered_tokens),
                                ),
                            )
                        )
                        return
            # An engine that ends a stream without a finish reason is a bug; say so.
            raise RuntimeError("engine ended the request without a finish reason")
        except InvalidRequest as err:
            self._emit_end(
                pb.Event(
                    request_id=rid,
                    failed=pb.Failed(code=code_pb2.INVALID_ARGUMENT, message=err.message, field=err.field),
                )
            )
        except TimeoutError:
            self._aborted(rid, completion, "timeout")
        except asyncio.CancelledError:
            # The engine's generator has been closed (vLLM aborted it) by the time we get here.
            if self.metrics and rid in self.abort_started:
                self.metrics.abort_latency.observe(time.monotonic() - self.abort_started[rid])
            self._aborted(rid, completion, self.abort_reasons.get(rid, "cancelled"))
        except Exception:
            log.exception("request %s failed in the engine", rid)
            self._emit_end(
                pb.Event(
                    request_id=rid,
                    failed=pb.Failed(
                        code=code_pb2.INTERNAL,
                        message="the inference engine failed on this request; see the worker log",
                    ),
                )
            )
        finally:
            self.counters.active_requests -= 1
            self._forget(rid)

    def _cancelled_unstarted(self, rid: str, task: asyncio.Task) -> None:
        """A request cancelled before its task ran at all (its cancel came in the same message as its
        submit, or before the loop got to it): asyncio never enters a coroutine cancelled that early, so its
        ``finally`` did not run. It still gets its one end event, and is forgotten as any other."""
        if self.tasks.get(rid) is not task:
            return  # it ran, and its finally forgot it
        self.counters.requests_total += 1
        self._aborted(rid, 0, self.abort_reasons.get(rid, "cancelled"))
        self._forget(rid)

    def _forget(self, rid: str) -> None:
        self.tasks.pop(rid, None)
        self.abort_reasons.pop(rid, None)
        self.abort_started.pop(rid, None)
        self._intervals.pop(rid, None)
        self._last_delta_at.pop(rid, None)
        self._wake.set()

    def _aborted(self, rid: str, completion: int, reason: str) -> None:
        self.counters.requests_aborted_total += 1
        self._emit_end(pb.Event(request_id=rid, aborted=pb.Aborted(completion_tokens=completion, reason=reason)))

    # --- outgoing -------------------------------------------------------------

    def _emit(self, event: pb.Event) -> None:
        self._outbox.append(event)
        self._wake.set()

    def _emit_end(self, event: pb.Event) -> None:
        """A request's last event (finished, failed or aborted): its held text goes first, in the same frame."""
        held = self._held.pop(event.request_id, None)
        if held is not None:
            self._outbox.append(held)
        self._emit(event)

    def _emit_delta(self, rid: str, text: str, tokens: int, calls=(), token_ids=()) -> None:
        calls = [pb.ToolCallDelta(index=c.index, id=c.id, name=c.name, arguments=c.arguments) for c in calls]
        unsent = self._unsent_deltas.get(rid)
        if unsent is not None:  # its previous step has not gone out yet: one delta for both
            unsent.text += text
            unsent.tokens += tokens
            unsent.tool_calls.extend(calls)
            unsent.token_ids.extend(token_ids)
            return
        delta = pb.TokenDelta(text=text, tokens=tokens, tool_calls=calls, token_ids=token_ids)
        event = pb.Event(request_id=rid, delta=delta)
        self._unsent_deltas[rid] = event.delta
        interval = self._intervals.get(rid)
        if interval is not None:
            now = asyncio.get_running_loop().time()
            last = self._last_delta_at.get(rid)
            if last is not None and now - last < interval:
                self._held[rid] = event
                tick, at = pacing.next_tick(last, interval)
                waiting = self._ticks.get(tick)
                if waiting is None:
                    waiting = self._ticks[tick] = []
                    asyncio.get_running_loop().call_at(at, self._tick, tick)
                waiting.append(rid)
                return
            self._last_delta_at[rid] = now
        self._emit(event)

    def _tick(self, tick: tuple[float, int]) -> None:
        """Send the deltas held for this tick: one timer and one frame per tick for all of the session's
        requests with that interval. A request's deltas are thus 1 to 1.25 intervals apart."""
        now = asyncio.get_running_loop().time()
        for rid in self._ticks.pop(tick, ()):
            event = self._held.pop(rid, None)
            if event is not None:  # None: the request ended meanwhile, its text went out with the end
                self._last_delta_at[rid] = now
                self._outbox.append(event)
        self._wake.set()

    def kv_changed(self, changes: kv_blocks.Changes) -> None:
        """The engine's prefix cache changed: tell this session's gateway in the next frame."""
        if self._kv is None:
            self._kv = kv_blocks.Changes()
        self._kv.merge(changes)
        self._wake.set()

    def _kv_message(self) -> pb.KvCacheChanges | None:
        kv, self._kv = self._kv, None
        if not kv:
            return None
        return pb.KvCacheChanges(
            reset=kv.cleared, stored_block_keys=list(kv.stored), removed_block_keys=list(kv.removed)
        )

    async def frames(self) -> AsyncIterator[pb.WorkerFrame]:
        """One frame per engine step (and per pacing tick).

        The engine wakes every request task of a step in one pass of the event
        loop; yielding once before draining lets all of them add their events,
        so they travel in a single frame.
        """
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)
            kv = self._kv_message()
            if self._outbox or kv is not None:
                events, self._outbox = self._outbox, []
                # Deltas still held stay open to the next steps; those in this frame are closed.
                self._unsent_deltas = {rid: ev.delta for rid, ev in self._held.items()}
                self._seq += 1
                self.counters.frames_sent_total += 1
                yield pb.WorkerFrame(events=events, seq=self._seq, kv_cache=kv)
            elif self._reader_done and not self.tasks:
                return


def _constraint(sub: pb.Submit) -> tuple[str, object]:
    c = sub.constraint
    kind = c.WhichOneof("kind")
    if kind is None:
        raise InvalidRequest("constraint", "no kind of constraint is set")
    return kind, tuple(c.choice.choices) if kind == "choice" else getattr(c, kind)


_CHOICES = {pb.TOOL_CHOICE_AUTO: "auto", pb.TOOL_CHOICE_NONE: "none", pb.TOOL_CHOICE_REQUIRED: "required"}


def _tools(sub: pb.Submit) -> tool_calls.ToolSpec | None:
    """The request's tools (checked by the gateway; a schema that is not JSON is still refused here)."""
    if not sub.tools:
        return None
    named = sub.tool_choice == pb.TOOL_CHOICE_NAMED
    if named and sub.tool_choice_name not in {t.name for t in sub.tools}:
        raise InvalidRequest("tool_choice", "the named tool is not one of the request's tools")
    try:
        return tool_calls.ToolSpec.of(
            sub.tools, "named" if named else _CHOICES[sub.tool_choice], sub.tool_choice_name, sub.parallel_tool_calls
        )
    except ValueError:
        raise InvalidRequest("tools", "a parameters schema is not JSON") from None
