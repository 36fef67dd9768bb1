"""The pool of workers: one multiplexed connection per worker.

Each ``WorkerConnection`` keeps one long-lived ``inference.v1.Worker/Session``
stream open to its worker, reconnecting with backoff when it breaks. Submits
and cancels queued while a write is in flight go out together in the next
``GatewayMessage``, so a burst of requests reaches the worker (and the engine)
as one batch. Frames coming back are demultiplexed onto ``RequestStream``s.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import time
from dataclasses import dataclass

import grpc

from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.errors import RpcError, unavailable
from gateway.routing import Router
from gateway.scheduler import Ticket
from gateway.streaming import RequestStream
from inference.v1 import worker_pb2 as wpb
from inference.v1 import worker_pb2_grpc as wpb_grpc

log = logging.getLogger("gateway.pool")

_FINISH = {wpb.FINISH_REASON_STOP: "stop", wpb.FINISH_REASON_LENGTH: "length"}
_MAX_BACKOFF_S = 10.0
# Detect a silently dead worker (no RST, e.g. a cut network) within ~30 s.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class WorkerConnection:
    def __init__(self, address: str, cfg: GatewayConfig, metrics: GatewayMetrics | None = None, pool: str = "default"):
        self.address = address
        self.pool = pool
        self.cfg = cfg
        self.metrics = metrics
        self._cancelled_at: dict[str, float] = {}  # request id -> when we sent its cancel
        self.info: wpb.WorkerInfo | None = None
        self.ready = False
        self.draining = False  # the worker's health says NOT_SERVING: no new requests
        self.retiring = False  # gone from DNS: no new requests, closed once its streams end
        self.last_error = "not connected yet"
        self.streams: dict[str, RequestStream] = {}
        self.on_change = lambda: None  # capacity or readiness changed (the scheduler pumps)
        self._submits: list[wpb.Submit] = []
        self._cancels: list[wpb.Cancel] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ready_event = asyncio.Event()

    @property
    def name(self) -> str:
        return self.info.name if self.info and self.info.name else self.address

    @property
    def outstanding_tokens(self) -> int:
        return sum(s.cost_tokens for s in self.streams.values())

    def has_room(self, cost_tokens: int) -> bool:
        """Within the worker's reported capacity: concurrent requests and batch tokens."""
        if not self.ready or self.draining or self.retiring or self.info is None:
            return False
        limit = max(1, self.info.max_concurrent_requests)
        if self.cfg.queue.max_in_flight_per_worker:
            limit = min(limit, self.cfg.queue.max_in_flight_per_worker)
        if len(self.streams) >= limit:
            return False
        cap = self.info.max_batch_tokens
        # An idle worker takes any request that fits its context, however large.
        return not cap or not self.streams or self.outstanding_tokens + cost_tokens <= cap

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"worker {self.address}")

    async def close(self) -> None:
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
        backoff = self.cfg.worker_reconnect_backoff_ms / 1000
        while True:
            try:
                await self._session()
                backoff = self.cfg.worker_reconnect_backoff_ms / 1000
                self.last_error = "the worker closed the session"
            except asyncio.CancelledError:
                self._fail_all("the gateway is shutting down")
                raise
            except grpc.aio.AioRpcError as err:
                self.last_error = f"{err.code().name}: {err.details()}"
            except Exception as err:  # a bug here must not kill the reconnect loop
                log.exception("worker %s: session failed", self.address)
                self.last_error = f"{type(err).__name__}: {err}"
            if self.ready:
                log.warning("worker %s lost: %s", self.address, self.last_error)
            self._set_ready(False)
            self._fail_all(f"worker {self.name} became unavailable ({self.last_error})")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        if ready:
            self.draining = False
            self._ready_event.set()
        else:
            self._ready_event.clear()
        self.on_change()

    async def _watch_health(self, channel) -> None:
        """Follow the worker's gRPC health: NOT_SERVING (draining) stops new requests."""
        stub = health_pb2_grpc.HealthStub(channel)
        async for resp in stub.Watch(health_pb2.HealthCheckRequest(service="inference.v1.Worker")):
            draining = resp.status != health_pb2.HealthCheckResponse.SERVING
            if draining != self.draining:
                self.draining = draining
                log.info("worker %s %s", self.name, "is draining" if draining else "is serving again")
                self.on_change()

    async def _session(self) -> None:
        timeout = self.cfg.worker_connect_timeout_ms / 1000
        # A fresh channel per attempt: gRPC's own reconnect backoff grows to
        # minutes, ours is capped at 10 s.
        async with grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS) as channel:
            stub = wpb_grpc.WorkerStub(channel)
            self.info = await stub.Info(wpb.InfoRequest(), timeout=timeout, wait_for_ready=True)
            call = stub.Session()
            writer = asyncio.create_task(self._write(call))
            health = asyncio.create_task(self._watch_health(channel))
            self._set_ready(True)
            log.info("worker %s ready: model %s, %d-token context, engine %s",
                     self.name, self.info.model, self.info.max_context_tokens, self.info.engine)
            try:
                async for frame in call:
                    self._on_frame(frame)
                # The worker ended the session cleanly (it is draining).
            finally:
                writer.cancel()
                health.cancel()
                call.cancel()
                self._set_ready(False)

    async def _write(self, call) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not (self._submits or self._cancels):
                continue
            msg = wpb.GatewayMessage(submits=self._submits, cancels=self._cancels)
            self._submits, self._cancels = [], []
            await call.write(msg)

    # --- requests ---------------------------------------------------------------------

    def submit(self, stream: RequestStream, submit: wpb.Submit) -> None:
        self.streams[stream.request_id] = stream
        stream.worker = self
        stream.worker_name = self.name
        stream.dispatched_at = time.monotonic()
        self._submits.append(submit)
        self._wake.set()

    def cancel(self, request_id: str, reason: str = "cancelled") -> None:
        stream = self.streams.pop(request_id, None)
        if stream is None:
            return
        if self.metrics:
            self.metrics.aborts.labels(reason).inc()
        self._cancelled_at[request_id] = time.monotonic()
        self.on_change()
        # A submit still waiting for the writer never needs to reach the worker.
        for i, s in enumerate(self._submits):
            if s.request_id == request_id:
                del self._submits[i]
                return
        self._cancels.append(wpb.Cancel(request_id=request_id))
        self._wake.set()

    def _release(self, request_id: str) -> RequestStream | None:
        stream = self.streams.pop(request_id, None)
        if stream is not None:
            self.on_change()
        return stream

    def _on_frame(self, frame: wpb.WorkerFrame) -> None:
        for ev in frame.events:
            kind = ev.WhichOneof("kind")
            if kind == "delta":
                stream = self.streams.get(ev.request_id)
                if stream is not None:
                    stream.on_delta(ev.delta.text, ev.delta.tokens)
                elif self.metrics and ev.request_id in self._cancelled_at:
                    self.metrics.tokens_after_cancel.inc(ev.delta.tokens)
            elif kind == "accepted":
                stream = self.streams.get(ev.request_id)
                if stream is not None:
                    stream.on_accepted(ev.accepted.prompt_tokens)
                    self.on_change()  # its cost shrank to the real prompt + max_tokens
            else:
                stream = self._release(ev.request_id)
                if stream is None:  # cancelled by us; this is the worker's acknowledgement
                    at = self._cancelled_at.pop(ev.request_id, None)
                    if kind == "aborted" and at is not None and self.metrics:
                        self.metrics.abort_latency.observe(time.monotonic() - at)
                    continue
                if kind == "finished":
                    f = ev.finished
                    stream.on_finished(_FINISH.get(f.finish_reason, "stop"), f.prompt_tokens, f.completion_tokens)
                elif kind == "failed":
                    code = _grpc_code(ev.failed.code)
                    stream.on_error(code, ev.failed.message, ev.failed.field)
                elif kind == "aborted":
                    if ev.aborted.reason == "timeout":
                        stream.on_error(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        "the request's deadline passed during generation")
                    else:
                        stream.on_error(grpc.StatusCode.ABORTED, f"the worker aborted the request ({ev.aborted.reason})")

    def _fail_all(self, message: str) -> None:
        for rid in list(self.streams):
            stream = self._release(rid)
            if stream is None:
                continue
            if self.metrics:
                self.metrics.aborts.labels("worker_lost").inc()
            if stream.completion_tokens:
                msg = (f"{message}; the stream was cut after {stream.completion_tokens} tokens "
                       "and is incomplete")
                stream.on_error(grpc.StatusCode.UNAVAILABLE, msg)
            elif stream.retries_left > 0:
                stream.on_retry(self)  # nothing was sent yet: the client need not know
            else:
                stream.on_error(grpc.StatusCode.UNAVAILABLE, f"{message} before it answered; retrying is safe")
        self._submits.clear()
        self._cancels.clear()
        self._cancelled_at.clear()


def _grpc_code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


@dataclass
class PoolSpec:
    """A named group of workers (e.g. stable and canary) with a traffic weight."""

    name: str
    weight: int
    addresses: list[str]
    dns: list[str]


class Pool:
    """All workers this gateway knows, in one or more weighted pools."""

    def __init__(self, cfg: GatewayConfig, metrics: GatewayMetrics | None = None):
        self.cfg = cfg
        self.metrics = metrics
        self.specs = [PoolSpec(p.name, p.weight, [w.address for w in p.workers], list(p.worker_dns))
                      for p in cfg.pools] or \
            [PoolSpec("default", 100, [w.address for w in cfg.workers], list(cfg.worker_dns))]
        self.weights = {spec.name: spec.weight for spec in self.specs}
        # With DNS names configured, a pool's static list is only a starting point.
        self.workers = [WorkerConnection(a, cfg, metrics, pool=spec.name)
                        for spec in self.specs if not spec.dns for a in spec.addresses]
        self.router = Router(cfg.queue.affinity_entries)
        self._on_change = lambda: None
        self._resolver: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    def set_on_change(self, callback) -> None:
        self._on_change = callback
        for w in self.workers:
            w.on_change = callback

    def set_weights(self, weights: dict[str, int]) -> None:
        """New traffic weights (config reload). Streams in flight are untouched; new requests follow."""
        unknown = set(weights) - set(self.weights)
        if unknown:
            raise ValueError(f"unknown pools {sorted(unknown)}; pools themselves change only on restart")
        self.weights.update(weights)
        log.info("pool weights now %s", self.weights)

    def choose_pool(self, model: str, key: str) -> str:
        """The pool for a request: a stable hash of ``key`` (tenant or session) over the weights, so
        one user stays on one pool until the weights change, and a change moves only the users in the
        shifted range. "" (any pool) when the chosen pool cannot serve the model right now."""
        serving = {w.pool for w in self.models().get(model, []) if not (w.draining or w.retiring)}
        pools = [spec.name for spec in self.specs if self.weights.get(spec.name, 0) > 0]
        total = sum(self.weights[p] for p in pools)
        if len(self.specs) == 1 or not total:
            return ""
        point = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 1_000_000
        point = point * total / 1_000_000
        for p in pools:
            point -= self.weights[p]
            if point < 0:
                return p if p in serving else ""
        return ""

    async def _resolve_forever(self) -> None:
        """Re-resolve each pool's ``worker_dns`` (a headless Service lists one address per pod)."""
        while True:
            found: set[tuple[str, str]] = set()
            try:
                for spec in self.specs:
                    for name in spec.dns:
                        host, _, port = name.rpartition(":")
                        for addr in await self._lookup(host, int(port)):
                            found.add((spec.name, addr))
            except OSError as err:
                log.warning("worker DNS lookup failed, keeping %d known workers: %s", len(self.workers), err)
                found = {(w.pool, w.address) for w in self.workers}
            static = {(spec.name, a) for spec in self.specs if not spec.dns for a in spec.addresses}
            known = {(w.pool, w.address) for w in self.workers}
            for pool, addr in sorted(found - known):
                log.info("worker %s (pool %s) discovered by DNS", addr, pool)
                w = WorkerConnection(addr, self.cfg, self.metrics, pool=pool)
                w.on_change = self._on_change
                self.workers.append(w)
                w.start()
            for w in [w for w in self.workers if (w.pool, w.address) not in found | static and not w.retiring]:
                log.info("worker %s (pool %s) left DNS; retiring it once its streams end", w.address, w.pool)
                w.retiring = True
                self._tasks.add(asyncio.create_task(self._retire(w)))
            self._on_change()
            await asyncio.sleep(self.cfg.worker_dns_refresh_s)

    async def _lookup(self, host: str, port: int) -> list[str]:
        """The addresses a worker DNS name resolves to (tests replace this)."""
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [f"[{sa[0]}]:{sa[1]}" if fam == socket.AF_INET6 else f"{sa[0]}:{sa[1]}" for fam, _, _, _, sa in infos]

    async def _retire(self, w: WorkerConnection) -> None:
        """A worker gone from DNS (scaled down, rescheduled) keeps its in-flight streams until they end,
        within the drain grace period, like a worker that drains itself."""
        deadline = time.monotonic() + self.cfg.drain_grace_s
        while w.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if w in self.workers:
            self.workers.remove(w)
        await w.close()
        self._on_change()

    def start(self) -> None:
        for w in self.workers:
            w.start()
        if any(spec.dns for spec in self.specs):
            self._resolver = asyncio.create_task(self._resolve_forever())

    async def close(self) -> None:
        if self._resolver:
            self._resolver.cancel()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*(w.close() for w in self.workers))

    async def wait_ready(self, timeout_s: float) -> bool:
        results = await asyncio.gather(*(w.wait_ready(timeout_s) for w in self.workers))
        return any(results)

    def models(self) -> dict[str, list[WorkerConnection]]:
        """Model name -> ready workers serving it."""
        out: dict[str, list[WorkerConnection]] = {}
        for w in self.workers:
            if w.info is not None:
                out.setdefault(w.info.model, [])
                if w.ready:
                    out[w.info.model].append(w)
        return out

    def default_model(self) -> str:
        if self.cfg.default_model:
            return self.cfg.default_model
        for w in self.workers:
            if w.info is not None:
                return w.info.model
        return ""

    def max_context_tokens(self, model: str) -> int | None:
        sizes = [w.info.max_context_tokens for w in self.workers if w.info is not None and w.info.model == model]
        return min(sizes) if sizes else None

    def place(self, ticket: Ticket) -> WorkerConnection | None:
        """A worker with room for the ticket (affinity first, then least loaded), or None."""
        candidates = [w for w in self.models().get(ticket.model, [])
                      if w not in ticket.exclude and (not ticket.pool or w.pool == ticket.pool)
                      and w.has_room(ticket.cost_tokens)]
        return self.router.choose(ticket.affinity, candidates)

    def can_serve(self, model: str, exclude=()) -> bool:
        """Some ready, non-draining worker serves the model (it may be busy)."""
        return any(not (w.draining or w.retiring) and w not in exclude for w in self.models().get(model, []))

    def no_worker_error(self, model: str) -> RpcError:
        """UNAVAILABLE naming each worker that could have served ``model`` ("" = any) and why it cannot."""
        tried = "; ".join(f"{w.address}: {w.last_error}" for w in self.workers
                          if not model or w.info is None or w.info.model == model)
        what = f"serving model {model!r}" if model else "(so no default model is known yet)"
        return unavailable(f"no worker {what} is reachable right now; tried {tried}", retry_after_s=1.0)
