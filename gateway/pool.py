"""The pool of workers: one multiplexed connection per worker.

Each ``WorkerConnection`` keeps one long-lived ``inference.v1.Worker/Session``
stream open to its worker, reconnecting with backoff when it breaks. Submits
and cancels queued while a write is in flight go out together in the next
``GatewayMessage``, so a burst of requests reaches the worker (and the engine)
as one batch. Frames coming back are demultiplexed onto ``RequestStream``s.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from gateway import routing
from gateway.config import GatewayConfig
from gateway.errors import RpcError, unavailable
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
    def __init__(self, address: str, cfg: GatewayConfig):
        self.address = address
        self.cfg = cfg
        self.info: wpb.WorkerInfo | None = None
        self.ready = False
        self.last_error = "not connected yet"
        self.streams: dict[str, RequestStream] = {}
        self.outstanding_tokens = 0
        self._submits: list[wpb.Submit] = []
        self._cancels: list[wpb.Cancel] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ready_event = asyncio.Event()

    @property
    def name(self) -> str:
        return self.info.name if self.info and self.info.name else self.address

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
            self._ready_event.set()
        else:
            self._ready_event.clear()

    async def _session(self) -> None:
        timeout = self.cfg.worker_connect_timeout_ms / 1000
        # A fresh channel per attempt: gRPC's own reconnect backoff grows to
        # minutes, ours is capped at 10 s.
        async with grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS) as channel:
            stub = wpb_grpc.WorkerStub(channel)
            self.info = await stub.Info(wpb.InfoRequest(), timeout=timeout, wait_for_ready=True)
            call = stub.Session()
            writer = asyncio.create_task(self._write(call))
            self._set_ready(True)
            log.info("worker %s ready: model %s, %d-token context, engine %s",
                     self.name, self.info.model, self.info.max_context_tokens, self.info.engine)
            try:
                async for frame in call:
                    self._on_frame(frame)
                # The worker ended the session cleanly (it is draining).
            finally:
                self._set_ready(False)
                writer.cancel()
                call.cancel()

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
        self.outstanding_tokens += stream.max_tokens
        stream.worker_name = self.name
        stream.dispatched_at = time.monotonic()
        self._submits.append(submit)
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        stream = self.streams.pop(request_id, None)
        if stream is None:
            return
        self.outstanding_tokens -= stream.max_tokens
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
            self.outstanding_tokens -= stream.max_tokens
        return stream

    def _on_frame(self, frame: wpb.WorkerFrame) -> None:
        for ev in frame.events:
            kind = ev.WhichOneof("kind")
            if kind == "delta":
                stream = self.streams.get(ev.request_id)
                if stream is not None:
                    stream.on_delta(ev.delta.text, ev.delta.tokens)
            elif kind == "accepted":
                stream = self.streams.get(ev.request_id)
                if stream is not None:
                    stream.on_accepted(ev.accepted.prompt_tokens)
            else:
                stream = self._release(ev.request_id)
                if stream is None:
                    continue  # cancelled by us; this is the worker's acknowledgement
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
            if stream.completion_tokens:
                msg = (f"{message}; the stream was cut after {stream.completion_tokens} tokens "
                       "and is incomplete")
            else:
                msg = f"{message} before it answered; retrying is safe"
            stream.on_error(grpc.StatusCode.UNAVAILABLE, msg)
        self._submits.clear()
        self._cancels.clear()


def _grpc_code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


class Pool:
    """All workers this gateway knows, by address."""

    def __init__(self, cfg: GatewayConfig):
        self.cfg = cfg
        self.workers = [WorkerConnection(w.address, cfg) for w in cfg.workers]

    def start(self) -> None:
        for w in self.workers:
            w.start()

    async def close(self) -> None:
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

    def dispatch(self, stream: RequestStream, submit: wpb.Submit) -> WorkerConnection:
        candidates = self.models().get(submit.model, [])
        worker = routing.choose(candidates)
        if worker is None:
            raise self.no_worker_error(submit.model)
        worker.submit(stream, submit)
        return worker

    def no_worker_error(self, model: str) -> RpcError:
        """UNAVAILABLE naming each worker that could have served ``model`` ("" = any) and why it cannot."""
        tried = "; ".join(f"{w.address}: {w.last_error}" for w in self.workers
                          if not model or w.info is None or w.info.model == model)
        what = f"serving model {model!r}" if model else "(so no default model is known yet)"
        return unavailable(f"no worker {what} is reachable right now; tried {tried}", retry_after_s=1.0)
