"""Our workers' protocol: one long-lived ``inference.v1.Worker/Session`` stream per worker.

It reconnects with backoff when the session breaks, follows the worker's
gRPC health, batches submits and cancels queued while a write is in flight
into the next ``GatewayMessage`` (so a burst reaches the engine as one
batch), and demultiplexes the frames coming back onto ``RequestStream``s.

Isolation between the requests sharing the session:
- Every request is known on the session by an id this gateway gives it
  (``wire_id``), never by anything a client sent, so two clients can never
  see, cancel or overwrite each other's requests.
- No message sent on the session is larger than the worker says it accepts
  (``WorkerInfo.max_message_bytes``): batches are split, and a request too
  large on its own fails alone.
- An event that cannot be handled fails its own request, not the session.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.errors import clip
from gateway.vocabulary import FINISH_FROM_WORKER, STOP, TOOL_CHOICE_TO_WORKER
from gateway.workers.connection import DEFAULT_MAX_MESSAGE_BYTES, Claim, Connection, Job, WorkerFacts, channel_options
from gateway.workers.streaming import RequestStream
from igw_worker_api.v1 import worker_pb2 as wpb
from igw_worker_api.v1 import worker_pb2_grpc as wpb_grpc

log = logging.getLogger("gateway.workers.session_protocol")

UINT32_MAX = 2**32 - 1


class WorkerConnection(Connection):
    """A worker speaking our Session protocol (``inference.v1``, generated in ``igw_worker_api.v1``)."""

    protocol = "igw"
    paces_deltas = True

    def __init__(self, *args, **kwargs):  # Connection's
        super().__init__(*args, **kwargs)
        self._info: wpb.WorkerInfo | None = None
        self._cancelled_at: dict[str, float] = {}  # wire id -> when we sent its cancel
        self._submits: list[tuple[str, wpb.Submit, int]] = []  # (wire id, submit, size) waiting for the writer
        self._cancels: list[wpb.Cancel] = []
        self._wake = asyncio.Event()

    @property
    def info(self) -> wpb.WorkerInfo | None:
        return self._info

    @info.setter
    def info(self, info: wpb.WorkerInfo | None) -> None:
        self._info = info
        self.facts = (
            None
            if info is None
            else WorkerFacts(
                name=info.name,
                model=info.model,
                max_context_tokens=info.max_context_tokens,
                max_concurrent_requests=info.max_concurrent_requests,
                max_batch_tokens=info.max_batch_tokens,
                max_message_bytes=info.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES,
                fill_in_middle=info.fill_in_middle,
                engine=info.engine,
            )
        )

    async def _watch_health(self, channel) -> None:
        """Follow the worker's gRPC health: NOT_SERVING (draining) stops new requests."""
        stub = health_pb2_grpc.HealthStub(channel)
        async for resp in stub.Watch(health_pb2.HealthCheckRequest(service="inference.v1.Worker")):
            draining = resp.status != health_pb2.HealthCheckResponse.SERVING
            if draining != self.draining:
                self.draining = draining
                log.info("worker %s %s", self.name, "is draining" if draining else "is serving again")
                self.on_change()

    async def _session(self) -> str | None:
        timeout = self.cfg.worker_connect_timeout_ms / 1000
        # A fresh channel per attempt: gRPC's own reconnect backoff grows to
        # minutes, ours is capped at 10 s.
        async with grpc.aio.insecure_channel(self.address, options=channel_options(self.cfg)) as channel:
            stub = wpb_grpc.WorkerStub(channel)
            self.info = await stub.Info(wpb.InfoRequest(), timeout=timeout, wait_for_ready=True)
            self.kv.block_size = self.info.kv_block_size
            if self.kv.reporting and self.cfg.placement.strategy == "kv_cache":
                self._load_tokenizer_soon(self.info.tokenizer_path)
            health = asyncio.create_task(self._watch_health(channel))
            try:
                return await self._carry_session(stub)
            finally:
                health.cancel()
                self._set_ready(False)

    async def _carry_session(self, stub: wpb_grpc.WorkerStub) -> str | None:
        """The Session stream, until it ends (the worker ended it cleanly when it returns: it is
        draining). ``gateway.native_relay.connection`` has the native relay carry it instead."""
        call = stub.Session()
        writer = asyncio.create_task(self._write(call))
        self._up()
        try:
            async for frame in call:
                self._on_frame(frame)
        finally:
            writer.cancel()
            call.cancel()

    def _up(self, how: str = "") -> None:
        self._established = True
        self._set_ready(True)
        log.info(
            "worker %s ready%s: model %s, %d-token context, engine %s",
            self.name,
            how,
            self.info.model,
            self.info.max_context_tokens,
            self.info.engine,
        )

    async def _write(self, call) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._submits or self._cancels:
                await call.write(self._next_message())

    def _next_message(self) -> wpb.GatewayMessage:
        """Everything waiting, up to the worker's message size limit (the rest goes next)."""
        msg = wpb.GatewayMessage(cancels=self._cancels)
        self._cancels = []
        budget = self.max_message_bytes - 1024  # headroom for the message's own framing
        size, n = msg.ByteSize(), 0
        for _, _, sub_size in self._submits:
            if n and size + sub_size > budget:
                break
            size += sub_size
            n += 1
        msg.submits.extend(s for _, s, _ in self._submits[:n])
        del self._submits[:n]
        return msg

    # --- requests ---------------------------------------------------------------------

    def open(self, stream: RequestStream, claim: Claim, job: Job) -> None:
        """Send the request, on the room ``claim`` holds here. Errors end ``stream`` alone."""
        wire_id = self._register(stream, claim)
        timeout_ms = 0
        if job.deadline is not None:
            left_ms = int((job.deadline - asyncio.get_running_loop().time()) * 1000)
            # uint32 on the wire: a deadline weeks away is as good as none, but it must not overflow.
            timeout_ms = min(UINT32_MAX, max(1, left_ms))
        submit = wpb.Submit(
            request_id=wire_id,
            model=job.model,
            messages=job.messages,
            sampling=job.sampling,
            timeout_ms=timeout_ms,
            trace_context=job.trace_context,
            prompt=job.prompt,
            suffix=job.suffix,
            stream_interval_ms=job.stream_interval_ms,
            constraint=job.constraint,
            report_token_ids=job.report_token_ids,
            resume_token_ids=job.resume_token_ids,
        )
        if job.tools is not None:
            submit.tools.extend(job.tools.tools)
            submit.tool_choice = TOOL_CHOICE_TO_WORKER[job.tools.choice]
            submit.tool_choice_name = job.tools.name
            submit.parallel_tool_calls = job.tools.parallel
        size = submit.ByteSize() + 8  # + its tag and length inside GatewayMessage
        if size > self.max_message_bytes - 1024:
            self.streams.pop(wire_id, None)
            stream.on_error(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is {size} bytes on the worker protocol; worker {self.name} accepts at "
                f"most {self.max_message_bytes}: shorten the prompt",
                "messages",
            )
            return
        self._submits.append((wire_id, submit, size))
        self._wake.set()

    def cancel(self, stream: RequestStream, reason: str = "cancelled") -> None:
        """Abort ``stream``'s request on the worker (no-op once it ended)."""
        wire_id = stream.wire_id
        if self.streams.pop(wire_id, None) is None:
            return
        stream.detach()
        if self.metrics:
            self.metrics.aborts.labels(reason).inc()
        # A submit still waiting for the writer never needs to reach the worker.
        for i, (wid, _, _) in enumerate(self._submits):
            if wid == wire_id:
                del self._submits[i]
                return
        self._cancelled_at[wire_id] = time.monotonic()
        self._cancels.append(wpb.Cancel(request_id=wire_id))
        self._wake.set()

    def _on_frame(self, frame: wpb.WorkerFrame) -> None:
        if frame.HasField("kv_cache"):
            kv = frame.kv_cache
            self.kv.apply(kv.reset, kv.stored_block_keys, kv.removed_block_keys)
        for ev in frame.events:
            try:
                self._on_event(ev)
            except Exception:  # a bug handling one event fails that request, never the session
                log.exception("worker %s: event for request %s could not be handled", self.name, ev.request_id)
                stream = self.streams.pop(ev.request_id, None)
                if stream is not None:
                    stream.on_error(grpc.StatusCode.INTERNAL, "the gateway failed handling this request's output")

    def _on_event(self, ev: wpb.Event) -> None:
        kind = ev.WhichOneof("kind")
        if kind == "delta":
            stream = self.streams.get(ev.request_id)
            if stream is not None:
                stream.on_delta(ev.delta.text, ev.delta.tokens, ev.delta.tool_calls, ev.delta.token_ids)
            elif self.metrics and ev.request_id in self._cancelled_at:
                self.metrics.tokens_after_cancel.inc(ev.delta.tokens)
            return
        if kind == "accepted":
            stream = self.streams.get(ev.request_id)
            if stream is not None:
                stream.on_accepted(ev.accepted.prompt_tokens)  # its claim shrinks to the real prompt + max_tokens
            return
        stream = self.streams.pop(ev.request_id, None)
        if stream is None:  # cancelled by us; this is the worker's acknowledgement
            at = self._cancelled_at.pop(ev.request_id, None)
            if kind == "aborted" and at is not None and self.metrics:
                self.metrics.abort_latency.observe(time.monotonic() - at)
            return
        if kind == "finished":
            f = ev.finished
            stream.on_finished(FINISH_FROM_WORKER.get(f.finish_reason, STOP), f.prompt_tokens, f.cached_prompt_tokens)
        elif kind == "failed":
            stream.on_error(_grpc_code(ev.failed.code), clip(ev.failed.message, 300), ev.failed.field[:64])
        elif kind == "aborted":
            if ev.aborted.reason == "timeout":
                stream.on_error(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed during generation")
            elif stream.completion_tokens and stream.can_resume:  # the worker is going away (drained, stopped)
                stream.on_resume(self)
            else:
                stream.on_error(
                    grpc.StatusCode.ABORTED,
                    f"the worker aborted the request ({clip(ev.aborted.reason, 40)}); retrying is safe",
                )

    def _forget_pending(self) -> None:
        self._submits.clear()
        self._cancels.clear()
        self._cancelled_at.clear()


def _grpc_code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN
