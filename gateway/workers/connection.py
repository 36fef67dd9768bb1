"""What every worker connection is, whatever its protocol: capacity and claims, readiness, the
reconnect loop, and what a worker runs for one request (``Job``).

A protocol supplies the session itself: ``gateway.workers.session_protocol`` (our workers'
``inference.v1.Worker/Session`` stream) and ``gateway.workers.vllm_grpc`` (stock vLLM gRPC servers,
with the gateway's tokenizer).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from gateway.errors import clip
from gateway.metrics import GatewayMetrics
from gateway.request import ToolUse
from gateway.workers.kv_cache import CachedBlocks
from gateway.workers.streaming import RequestStream
from gateway.workers.tokenization import ModelTokenizer
from igw_common.config import GatewayConfig
from igw_worker_api.v1 import worker_pb2 as wpb

log = logging.getLogger("gateway.workers.connection")

# gRPC's default receive limit: what a worker that does not report its own is assumed to accept.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Frames from our workers are bounded by what the engine produces in one step; this only guards the gateway.
FRAME_LIMIT_BYTES = 64 * 1024 * 1024
_MAX_BACKOFF_S = 10.0
# Ids on the wire are unique across all workers of this process, so a late event for a
# retried request can never be taken for its next attempt.
_wire_ids = itertools.count(1)


def channel_options(cfg: GatewayConfig) -> list[tuple[str, int]]:
    """Keepalive pings detect a silently dead worker (no RST, e.g. a cut network); the worker's
    server permits pings this often (``worker.min_ping_interval_ms`` must not exceed them)."""
    return [
        ("grpc.keepalive_time_ms", cfg.worker_keepalive_ms),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", FRAME_LIMIT_BYTES),
    ]


@dataclass
class Job:
    """What a worker runs for one request, whatever the worker's protocol."""

    model: str
    messages: list[wpb.ChatMessage]
    sampling: wpb.Sampling
    deadline: float | None = None  # event-loop time; None = no deadline
    trace_context: dict[str, str] = field(default_factory=dict)
    prompt: str = ""  # a raw prompt instead of messages (no chat template)
    suffix: str = ""  # fill-in-the-middle: the text after the cursor
    stream_interval_ms: int = 0  # at most one delta per this many ms (0 = per engine step)
    constraint: wpb.Constraint | None = None  # structured output, enforced by the engine
    tools: ToolUse | None = None  # functions the model may call
    report_token_ids: bool = False  # the worker sends each token's id (so the request can be resumed)
    prompt_token_ids: tuple[int, ...] = ()  # the rendered prompt, when placement already tokenized it
    resume_token_ids: tuple[int, ...] = ()  # continue after these tokens another worker generated


class Claim:
    """Room on one worker held for one request: a slot and its tokens, from grant to end."""

    __slots__ = ("conn", "cost_tokens", "prompt_tokens", "prefill_tokens", "_held")

    def __init__(self, conn: "Connection", cost_tokens: int, prompt_tokens: int = 0, prefill_tokens: int = 0):
        self.conn, self.cost_tokens, self.prompt_tokens, self._held = conn, cost_tokens, prompt_tokens, True
        self.prefill_tokens = prefill_tokens
        conn.in_flight += 1
        conn.outstanding_tokens += cost_tokens
        conn.prompt_tokens += prompt_tokens
        conn.prefill_tokens += prefill_tokens

    def prefilled(self) -> None:
        """Its first token came: the prompt is no longer work waiting on the worker."""
        if self.prefill_tokens:
            self.conn.prefill_tokens -= self.prefill_tokens
            self.prefill_tokens = 0

    def resize(self, cost_tokens: int, prompt_tokens: int | None = None) -> None:
        """The real prompt is known: hold prompt + max_tokens from now on."""
        if self._held:
            self.conn.outstanding_tokens += cost_tokens - self.cost_tokens
            self.cost_tokens = cost_tokens
            if prompt_tokens is not None:
                self.conn.prompt_tokens += prompt_tokens - self.prompt_tokens
                self.prompt_tokens = prompt_tokens
            self.conn.on_change()

    def release(self) -> None:
        if self._held:
            self._held = False
            self.conn.in_flight -= 1
            self.conn.outstanding_tokens -= self.cost_tokens
            self.conn.prompt_tokens -= self.prompt_tokens
            self.prefilled()
            self.conn.on_change()


@dataclass
class WorkerFacts:
    """What the gateway knows about a worker once connected, whatever its protocol."""

    name: str
    model: str
    max_context_tokens: int
    max_concurrent_requests: int
    max_batch_tokens: int = 0  # 0 = no token cap
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    fill_in_middle: bool = False
    engine: str = ""


class Connection:
    """One worker of the set: capacity, claims, readiness and the reconnect loop, whatever its protocol.

    A protocol (``session_protocol.WorkerConnection``, ``vllm_grpc.VllmGrpcConnection``) supplies
    ``_session()`` (connect, learn the facts, serve until the connection breaks), ``open()`` and
    ``cancel()``."""

    protocol = ""
    # Whether the worker merges a request's steps to its stream interval itself (Submit.stream_interval_ms);
    # if not, the request core's Pacer does it on the way to the client.
    paces_deltas = False

    def __init__(
        self,
        address: str,
        cfg: GatewayConfig,
        metrics: GatewayMetrics | None = None,
        pool: str = "default",
        tokenizer="",
    ):
        self.address = address
        self.pool = pool
        self.overflow = False  # of an overflow pool (gateway.pools[].overflow): only for requests others cannot take
        self.tokenizer_path = tokenizer  # the model folder on this host (config), else what the worker reports
        self.tokenizer: ModelTokenizer | None = None
        # Its engine's prefix cache, where it reports it (placement by cached prefix).
        self.kv = CachedBlocks(cfg.placement.kv_max_blocks_per_worker)
        self.cfg = cfg
        self.metrics = metrics
        self.facts: WorkerFacts | None = None
        self.ready = False
        self.draining = False  # the worker's health says NOT_SERVING: no new requests
        self.retiring = False  # gone from DNS: no new requests, closed once its streams end
        self.last_error = "not connected yet"
        self.in_flight = 0  # claims held (requests granted to this worker and not ended)
        self.outstanding_tokens = 0  # their prompt + max_tokens
        self.prompt_tokens = 0  # their prompts alone
        self.prefill_tokens = 0  # of those, the ones still to compute (before each one's first token)
        self.streams: dict[str, RequestStream] = {}  # wire id -> stream
        self.on_change = lambda: None  # capacity or readiness changed (the scheduler pumps)
        self._task: asyncio.Task[None] | None = None
        self._ready_event = asyncio.Event()
        self._established = False
        self._tokenizer_task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.facts.name if self.facts and self.facts.name else self.address

    @property
    def model(self) -> str | None:
        return self.facts.model if self.facts is not None else None

    @property
    def max_context_tokens(self) -> int:
        return self.facts.max_context_tokens if self.facts is not None else 0

    @property
    def fill_in_middle(self) -> bool:
        return self.facts is not None and self.facts.fill_in_middle

    @property
    def max_message_bytes(self) -> int:
        return (self.facts.max_message_bytes if self.facts is not None else 0) or DEFAULT_MAX_MESSAGE_BYTES

    @property
    def accepting(self) -> bool:
        """Connected and taking new requests (it may be busy)."""
        return self.ready and not self.draining and not self.retiring and self.facts is not None

    def has_room(self, cost_tokens: int) -> bool:
        """Within the worker's reported capacity: concurrent requests and batch tokens."""
        if not self.accepting:
            return False
        limit = max(1, self.facts.max_concurrent_requests)
        if self.cfg.queue.max_in_flight_per_worker:
            limit = min(limit, self.cfg.queue.max_in_flight_per_worker)
        if self.in_flight >= limit:
            return False
        cap = self.facts.max_batch_tokens
        # An idle worker takes any request that fits its context, however large.
        return not cap or not self.in_flight or self.outstanding_tokens + cost_tokens <= cap

    def claim(self, cost_tokens: int, prompt_tokens: int = 0, prefill_tokens: int | None = None) -> Claim:
        """Room for a request; ``prefill_tokens``: what of its prompt this worker must compute (default:
        all of it)."""
        return Claim(self, cost_tokens, prompt_tokens, prompt_tokens if prefill_tokens is None else prefill_tokens)

    @property
    def active_tokens(self) -> int:
        """Tokens its requests hold in the engine now (prompts + what they generated so far): the load that
        placement by cached prefix weighs, not max_tokens, which an agent sets far above what it uses."""
        return self.prompt_tokens + sum(s.completion_tokens for s in self.streams.values())

    def open(self, stream: RequestStream, claim: Claim, job: Job) -> None:
        """Send the request, on the room ``claim`` holds here. Errors end ``stream`` alone."""
        raise NotImplementedError

    def cancel(self, stream: RequestStream, reason: str = "cancelled") -> None:
        """Abort ``stream``'s request on the worker (no-op once it ended)."""
        raise NotImplementedError

    async def _session(self) -> str | None:
        """One session with the worker, until it ends; returns why when that was no error (None: the
        worker closed it)."""
        raise NotImplementedError

    def _register(self, stream: RequestStream, claim: Claim) -> str:
        """Give the stream its wire id and put it on this worker."""
        stream.wire_id = wire_id = str(next(_wire_ids))
        stream.worker, stream.claim, stream.worker_name = self, claim, self.name
        stream.relayed = False
        stream.dispatched_at = time.monotonic()
        self.streams[wire_id] = stream
        return wire_id

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"worker {self.address}")

    async def close(self) -> None:
        if self._tokenizer_task:
            self._tokenizer_task.cancel()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def wait_ready(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._ready_event.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def _run(self) -> None:
        first = backoff = self.cfg.worker_reconnect_backoff_ms / 1000
        while True:
            self._established = False
            try:
                # A session that ends without an error may say why (None: the worker closed it).
                self.last_error = await self._session() or "the worker closed the session"
            except asyncio.CancelledError:
                self._fail_all()
                raise
            except grpc.aio.AioRpcError as err:
                self.last_error = f"{err.code().name}: {err.details()}"
            except Exception as err:  # a bug here must not kill the reconnect loop
                log.exception("worker %s: session failed", self.address)
                self.last_error = f"{type(err).__name__}: {err}"
            if self.ready:
                log.warning("worker %s lost: %s", self.address, self.last_error)
            self._set_ready(False)
            self._fail_all()
            if self._established:
                # It was up: this is a new outage, not the next failed attempt of an old one.
                backoff = first
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

    def _load_tokenizer_soon(self, reported: str) -> None:
        """Load the model's tokenizer in the background, for placement by cached prefix. Readiness does not
        wait for it: a gateway that has just started takes requests at once, placed by affinity until the
        tokenizer is loaded."""
        if self.tokenizer is None and (self._tokenizer_task is None or self._tokenizer_task.done()):
            self._tokenizer_task = asyncio.create_task(self._load_tokenizer(reported))

    async def _load_tokenizer(self, reported: str) -> None:
        """The model's tokenizer from a folder on this host, if there is one: the configured one, else the
        one the worker reports."""
        for folder in (self.tokenizer_path, reported):
            if folder and (Path(folder) / "tokenizer.json").is_file():
                try:
                    self.tokenizer = await asyncio.to_thread(ModelTokenizer, folder)
                except Exception as err:  # a broken folder costs placement its cache, not the connection
                    log.warning("worker %s: cannot load the tokenizer in %s: %s", self.address, folder, err)
                    continue
                return
        log.warning(
            "worker %s reports its prefix cache but its tokenizer is not on this host (%s); it is placed by "
            "affinity. Set gateway.workers[].tokenizer to the model folder",
            self.address,
            clip(reported, 200) or "no path reported",
        )

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.kv.clear()  # a new session reports the whole cache again; a lost worker's is gone
        if ready:
            self.draining = False
            self._ready_event.set()
        else:
            self._ready_event.clear()
        self.on_change()

    def _fail_all(self) -> None:
        """The connection is gone: every request on it ends now (or is placed again, if nothing was sent yet)."""
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            self._fail(stream)
        self._forget_pending()

    def _fail(self, stream: RequestStream) -> None:
        """One request whose worker went away: placed again if it had no token yet, continued elsewhere from
        its tokens if it can be, else cut, clearly."""
        if self.metrics:
            self.metrics.aborts.labels("worker_lost").inc()
        if stream.completion_tokens and stream.can_resume:
            stream.on_resume(self)  # the client sees a pause
        elif stream.completion_tokens:
            stream.on_error(
                grpc.StatusCode.UNAVAILABLE,
                f"the worker serving this request became unavailable; the stream was cut after "
                f"{stream.completion_tokens} tokens and is incomplete",
            )
        elif stream.retries_left > 0:
            stream.on_retry(self)  # nothing was sent yet: the client need not know
        else:
            stream.on_error(
                grpc.StatusCode.UNAVAILABLE,
                "the worker serving this request became unavailable before it answered; retrying is safe",
            )

    def _forget_pending(self) -> None:
        """Drop protocol state of requests that are gone (what was queued to send, cancels in flight)."""


class CallPerRequest(Connection):
    """A protocol with one call of its own per request (stock vLLM gRPC, OpenAI HTTP): ``open`` starts it
    as a task in ``_calls``, ``cancel`` cancels that task."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._calls: dict[str, asyncio.Task] = {}

    def cancel(self, stream: RequestStream, reason: str = "cancelled") -> None:
        if self.streams.pop(stream.wire_id, None) is None:
            return
        stream.detach()
        if self.metrics:
            self.metrics.aborts.labels(reason).inc()
        task = self._calls.pop(stream.wire_id, None)
        if task is not None:
            task.cancel()
        self._cancelled(stream.wire_id)

    def _cancelled(self, wire_id: str) -> None:
        """What the protocol does beyond cancelling the call (e.g. an explicit abort on the server)."""

    def _mine(self, wire_id: str, stream: RequestStream) -> bool:
        """The stream is still this call's to end (not cancelled, not failed with the connection)."""
        return self.streams.get(wire_id) is stream

    def _take(self, wire_id: str, stream: RequestStream) -> bool:
        """Take the stream off this worker to end it; False if something else ended it already."""
        return self.streams.pop(wire_id, None) is stream

    def _forget_pending(self) -> None:
        for task in self._calls.values():
            task.cancel()
        self._calls.clear()
