"""One request's stream between a worker and the client.

The worker connection pushes events into a ``RequestStream``; the request
core pulls them out at the client's pace. Deltas that arrive while the
client is still taking the previous one are merged, so a slow client costs
one string (bounded by the request's ``max_tokens``), never a queue of
messages or one object per token.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc

from igw_common import pacing
from igw_common.tool_calls import CallDelta

# Pending text is joined into one string once this many pieces pile up: a slow
# reader then holds a few strings, not one object per engine step.
_COMPACT_AT = 32


class Pacer:
    """Clock for streams that merge engine steps (``stream_interval_ms``) when their worker does not
    (stock vLLM; our workers pace at the source, ``inference.session``): a delta that comes less than an
    interval after the stream's last message waits for the first tick an interval after that message, so
    the steps in between arrive as one message; one that comes later goes out at once (a stream slower than
    its interval costs no timer wakeup per token). The ticks are ``igw_common.pacing``'s, as on our
    workers: one timer per tick for all streams, not one per stream, and messages 1 to 1.25 intervals
    apart. A stream that ends meanwhile stops waiting at once (its last text and ``done`` never wait)."""

    def __init__(self):
        self._waiters: dict[tuple[float, int], list[asyncio.Future]] = {}

    async def after_send(self, interval_s: float, stream: "RequestStream", sent_at: float) -> None:
        """Return when the stream may take its next update, its last message having gone out at ``sent_at``
        (the loop's clock)."""
        await stream.ready()
        if asyncio.get_running_loop().time() - sent_at < interval_s:
            await self.wait(interval_s, stream, sent_at)

    async def wait(self, interval_s: float, stream: "RequestStream", sent_at: float) -> None:
        if stream.finished:
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        tick, at = pacing.next_tick(sent_at, interval_s)
        waiters = self._waiters.get(tick)
        if waiters is None:
            waiters = self._waiters[tick] = []
            loop.call_at(at, self._tick, tick)
        waiters.append(waiter)
        stream.pacing = waiter
        try:
            await waiter
        finally:
            stream.pacing = None

    def _tick(self, tick: tuple[float, int]) -> None:
        for waiter in self._waiters.pop(tick, ()):
            if not waiter.done():
                waiter.set_result(None)


def merge_pieces(pieces: list[CallDelta], new) -> None:
    """Add ``new`` (the worker's ToolCallDelta messages) to ``pieces``, joining the arguments of one call's
    consecutive pieces: a merged delta carries each call's new arguments once."""
    for d in new:
        last = pieces[-1] if pieces else None
        if last is not None and last.index == d.index and not d.id and not d.name:
            last.arguments += d.arguments
        else:
            pieces.append(CallDelta(d.index, d.id, d.name, d.arguments))


@dataclass(slots=True)
class Update:
    """What the request core should do next; exactly one group of fields is set."""

    accepted_prompt_tokens: int | None = None
    text: str = ""
    tokens: int = 0
    tool_calls: tuple[CallDelta, ...] = ()  # pieces of the tool calls the text made (requests with tools)
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls" when the request is done
    error: tuple[grpc.StatusCode, str, str] | None = None  # (code, message, field)
    retry_from: object | None = None  # the worker failed before the first token: place it again
    resume_from: object | None = None  # the worker was lost after tokens went out: continue on another


class RequestStream:
    def __init__(self, max_tokens: int, cost_tokens: int, retries: int = 0, itl_observer=None, resumes: int = 0):
        self.max_tokens = max_tokens
        # Tokens this request may occupy on its worker: an estimate of the
        # prompt + max_tokens until the worker reports the real prompt size.
        self.cost_tokens = cost_tokens
        self.retries_left = retries
        self.resumes_left = resumes
        # The ids of the tokens generated so far, to resume from (None: not resumable, or one went unreported).
        self.token_ids: list[int] | None = [] if resumes else None
        self.wire_id = ""  # the id the gateway gave it on the worker session (never the client's)
        self.worker = None  # the worker connection serving it
        self.claim = None  # the room held for it on that worker
        self.worker_name = ""
        # The native relay writes this request's deltas to its client itself (gateway.native_relay); set
        # by each opening, so a request resumed on another kind of worker is written by whoever carries it.
        self.relayed = False
        self.created = time.monotonic()
        self.dispatched_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self._itl = itl_observer  # histogram child: inter-token latency observed as tokens arrive
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0  # of them, found in the engine's prefix cache (its own count)
        self.completion_tokens = 0  # tokens received from the worker
        self._accepted: int | None = None
        self._text: list[str] = []
        self._calls: list[CallDelta] = []
        self._tokens = 0
        self._final: Update | None = None
        self._wake = asyncio.Event()
        self.pacing: asyncio.Future | None = None  # set while the core waits for its Pacer tick

    # --- worker side ------------------------------------------------------------

    def on_accepted(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.cost_tokens = prompt_tokens + self.max_tokens
        if self.claim is not None:
            self.claim.resize(self.cost_tokens, prompt_tokens)
        self._accepted = prompt_tokens
        self._wake.set()

    def on_retry(self, failed_worker) -> None:
        """The worker failed before any token: the core places the request again."""
        self.retries_left -= 1
        self.detach()
        self._final = Update(retry_from=failed_worker)
        self._wake.set()

    @property
    def can_resume(self) -> bool:
        """Lost mid-answer, it can go on elsewhere: resumes left, every token's id known, tokens still to make."""
        ids = self.token_ids
        return self.resumes_left > 0 and ids is not None and len(ids) == self.completion_tokens < self.max_tokens

    def on_resume(self, failed_worker) -> None:
        """The worker was lost after some tokens: the core continues the request on another worker."""
        self.resumes_left -= 1
        self.detach()
        self._final = Update(resume_from=failed_worker)
        self._wake.set()

    def resume(self) -> None:
        """Back in play after a retry or resume was taken."""
        self._final = None

    def on_delta(self, text: str, tokens: int, calls=(), token_ids=()) -> None:
        if tokens:
            now = time.monotonic()
            if self.claim is not None:
                self.claim.prefilled()  # (on this worker: a resumed stream prefills again on the next)
            if self.first_token_at is None:
                self.first_token_at = now
            elif self._itl is not None:
                per_token = (now - self.last_token_at) / tokens
                for _ in range(tokens):
                    self._itl.observe(per_token)
            self.last_token_at = now
        self.completion_tokens += tokens
        if self.token_ids is not None:
            if len(token_ids) == tokens:
                self.token_ids.extend(token_ids)
            else:
                self.token_ids = None  # a worker that does not report them: this request cannot resume
        if text:
            self._text.append(text)
            if len(self._text) >= _COMPACT_AT:
                self._text = ["".join(self._text)]
        if calls:
            merge_pieces(self._calls, calls)
        self._tokens += tokens
        self._wake.set()

    def on_finished(self, finish_reason: str, prompt_tokens: int, cached_prompt_tokens: int = 0) -> None:
        self.prompt_tokens = prompt_tokens
        self.cached_prompt_tokens = cached_prompt_tokens
        self._finish(Update(finish_reason=finish_reason))

    def on_error(self, code: grpc.StatusCode, message: str, field: str = "") -> None:
        self._finish(Update(error=(code, message, field)))

    def _finish(self, update: Update) -> None:
        self.detach()
        if self._final is None:
            self._final = update
            self._wake.set()
            if self.pacing is not None and not self.pacing.done():
                self.pacing.set_result(None)  # the end goes out now, not at the next tick

    def detach(self) -> None:
        """Off its worker: the room it held there is free."""
        if self.claim is not None:
            self.claim.release()
            self.claim = None
        self.worker = None

    @property
    def finished(self) -> bool:
        return self._final is not None

    # --- core side -----------------------------------------------------------------

    async def ready(self) -> None:
        """Until there is something to take: the acceptance, text or the end."""
        while (
            self._accepted is None and not self._text and not self._calls and not self._tokens and self._final is None
        ):
            self._wake.clear()
            await self._wake.wait()

    async def next(self) -> Update:
        """The next thing to send: acceptance, then merged text, then the end."""
        while True:
            if self._accepted is not None:
                n, self._accepted = self._accepted, None
                return Update(accepted_prompt_tokens=n)
            if self._text or self._tokens or self._calls:
                text = self._text[0] if len(self._text) == 1 else "".join(self._text)
                update = Update(text=text, tokens=self._tokens, tool_calls=tuple(self._calls))
                self._text, self._tokens, self._calls = [], 0, []
                return update
            if self._final is not None:
                return self._final
            self._wake.clear()
            await self._wake.wait()

    def ms_since_created(self, at: float | None) -> int:
        return max(0, round(((at if at is not None else time.monotonic()) - self.created) * 1000))
