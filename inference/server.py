"""The inference worker: a grpc.aio server around one engine adapter.

Speaks ``inference.v1.Worker``. A gateway opens one long-lived ``Session``
stream and multiplexes its requests over it; the worker runs each request as
a task driving the engine and sends back one frame per engine step holding
the events of every request that step advanced (see ``_Session.frames``).

Run: ``igw-worker --config config.yaml`` (or ``python -m inference.server``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator

import grpc
from google.rpc import code_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway import config as config_mod
from gateway import tracing
from gateway.logs import setup_logging
from inference.engine import Engine, InvalidRequest, SamplingSpec
from inference.metrics import WorkerMetrics
from inference.v1 import worker_pb2 as pb
from inference.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger("inference.worker")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Worker"].full_name
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


class Counters:
    """Lifetime counters of this worker process (reported by the Load RPC)."""

    def __init__(self) -> None:
        self.requests_total = 0
        self.requests_aborted_total = 0
        self.completion_tokens_total = 0
        self.frames_sent_total = 0
        self.active_requests = 0


class _Session:
    """One gateway connection: its requests and its outgoing frames."""

    def __init__(self, session_id: int, engine: Engine, counters: Counters, metrics: WorkerMetrics | None = None,
                 tracer=None):
        self.id = session_id
        self.tracer = tracer or tracing.tracer(None, "igw-worker")
        self.engine = engine
        self.counters = counters
        self.metrics = metrics
        self.abort_started: dict[str, float] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.abort_reasons: dict[str, str] = {}
        self._outbox: list[pb.Event] = []
        self._wake = asyncio.Event()
        self._reader_done = False
        self._seq = 0

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
            self._emit(pb.Event(request_id=rid, failed=pb.Failed(
                code=code_pb2.ALREADY_EXISTS if rid else code_pb2.INVALID_ARGUMENT,
                message=f"request id {rid!r} is empty or already in use on this session",
                field="request_id")))
            return
        self.tasks[rid] = asyncio.create_task(self._run(sub), name=f"request {rid}")

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
        with self.tracer.start_as_current_span("igw.worker.request", context=tracing.extract(sub.trace_context),
                                               kind=tracing.SpanKind.SERVER) as span:
            span.set_attribute("igw.request_id", sub.request_id)
            await self._run_traced(sub, span)

    async def _run_traced(self, sub: pb.Submit, span) -> None:
        rid = sub.request_id
        completion = 0
        self.counters.requests_total += 1
        self.counters.active_requests += 1
        try:
            if sub.model != self.engine.model:
                raise InvalidRequest("model", f"this worker serves {self.engine.model!r}, not {sub.model!r}")
            s = sub.sampling
            sampling = SamplingSpec(
                max_tokens=s.max_tokens,
                temperature=s.temperature if s.HasField("temperature") else None,
                top_p=s.top_p if s.HasField("top_p") else None,
                stop=tuple(s.stop),
                seed=s.seed if s.HasField("seed") else None,
            )
            if sampling.max_tokens <= 0:
                raise InvalidRequest("sampling.max_tokens", "max_tokens must be > 0")
            prompt = self.engine.render([{"role": m.role, "content": m.content} for m in sub.messages])
            self.engine.check(prompt, sampling)
            self._emit(pb.Event(request_id=rid, accepted=pb.Accepted(prompt_tokens=prompt.num_tokens)))
            timeout = sub.timeout_ms / 1000 if sub.timeout_ms else None
            async with asyncio.timeout(timeout):
                # Engine request ids must be unique across sessions.
                async for step in self.engine.generate(f"s{self.id}-{rid}", prompt, sampling):
                    completion += step.tokens
                    self.counters.completion_tokens_total += step.tokens
                    if step.tokens or step.text:
                        self._emit(pb.Event(request_id=rid, delta=pb.TokenDelta(text=step.text, tokens=step.tokens)))
                    if step.finish_reason is not None:
                        span.set_attribute("gen_ai.usage.input_tokens", prompt.num_tokens)
                        span.set_attribute("gen_ai.usage.output_tokens", completion)
                        self._emit(pb.Event(request_id=rid, finished=pb.Finished(
                            finish_reason=_FINISH[step.finish_reason],
                            prompt_tokens=prompt.num_tokens, completion_tokens=completion)))
                        return
            # An engine that ends a stream without a finish reason is a bug; say so.
            raise RuntimeError("engine ended the request without a finish reason")
        except InvalidRequest as err:
            self._emit(pb.Event(request_id=rid, failed=pb.Failed(
                code=code_pb2.INVALID_ARGUMENT, message=err.message, field=err.field)))
        except TimeoutError:
            self._aborted(rid, completion, "timeout")
        except asyncio.CancelledError:
            # The engine's generator has been closed (vLLM aborted it) by the time we get here.
            if self.metrics and rid in self.abort_started:
                self.metrics.abort_latency.observe(time.monotonic() - self.abort_started[rid])
            self._aborted(rid, completion, self.abort_reasons.get(rid, "cancelled"))
        except Exception:
            log.exception("request %s failed in the engine", rid)
            self._emit(pb.Event(request_id=rid, failed=pb.Failed(
                code=code_pb2.INTERNAL, message="the inference engine failed on this request; see the worker log")))
        finally:
            self.counters.active_requests -= 1
            self.tasks.pop(rid, None)
            self.abort_reasons.pop(rid, None)
            self.abort_started.pop(rid, None)
            self._wake.set()

    def _aborted(self, rid: str, completion: int, reason: str) -> None:
        self.counters.requests_aborted_total += 1
        self._emit(pb.Event(request_id=rid, aborted=pb.Aborted(completion_tokens=completion, reason=reason)))

    # --- outgoing -------------------------------------------------------------

    def _emit(self, event: pb.Event) -> None:
        self._outbox.append(event)
        self._wake.set()

    async def frames(self) -> AsyncIterator[pb.WorkerFrame]:
        """One frame per engine step.

        The engine wakes every request task of a step in one pass of the event
        loop; yielding once before draining lets all of them add their events,
        so they travel in a single frame.
        """
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)
            if self._outbox:
                events, self._outbox = self._outbox, []
                self._seq += 1
                self.counters.frames_sent_total += 1
                yield pb.WorkerFrame(events=events, seq=self._seq)
            elif self._reader_done and not self.tasks:
                return


class WorkerServicer(pb_grpc.WorkerServicer):
    def __init__(self, engine: Engine, name: str, max_concurrent_requests: int, tracer=None):
        self.engine = engine
        self.tracer = tracer or tracing.tracer(None, "igw-worker")
        self.name = name
        self.max_concurrent_requests = max_concurrent_requests
        self.counters = Counters()
        self.metrics = WorkerMetrics(self.counters, engine, max_concurrent_requests)
        self.sessions: set[_Session] = set()
        self._ids = itertools.count(1)

    async def Session(self, request_iterator, context):
        session = _Session(next(self._ids), self.engine, self.counters, self.metrics, self.tracer)
        self.sessions.add(session)
        reader = asyncio.create_task(session.read(request_iterator))
        try:
            async for frame in session.frames():
                yield frame
        finally:
            # Gateway gone or stream broken: nobody will read these requests.
            reader.cancel()
            session.abort_all("session_closed")
            self.sessions.discard(session)

    async def Info(self, request, context):
        return pb.WorkerInfo(
            name=self.name,
            model=self.engine.model,
            max_context_tokens=self.engine.max_context_tokens,
            max_concurrent_requests=self.max_concurrent_requests,
            engine=self.engine.name,
            max_batch_tokens=self.engine.max_batch_tokens,
        )

    async def Load(self, request, context):
        c = self.counters
        return pb.WorkerLoad(
            active_requests=c.active_requests,
            requests_total=c.requests_total,
            requests_aborted_total=c.requests_aborted_total,
            completion_tokens_total=c.completion_tokens_total,
            frames_sent_total=c.frames_sent_total,
            engine_unfinished_requests=self.engine.unfinished_requests(),
        )


def make_engine(cfg: config_mod.WorkerConfig) -> Engine:
    if cfg.engine == "synthetic":
        from inference.synthetic_engine import SyntheticEngine

        return SyntheticEngine(cfg.model_name, cfg.synthetic)
    from inference.vllm_engine import VllmEngine

    return VllmEngine(cfg.model_name, cfg.vllm)


class WorkerServer:
    """The worker's gRPC server around a started engine; start() and drain() for tests and main."""

    def __init__(self, cfg: config_mod.WorkerConfig, engine: Engine, tracer_provider=None):
        self.cfg = cfg
        self.engine = engine
        self.name = cfg.name or cfg.listen
        self.servicer = WorkerServicer(engine, self.name, cfg.max_concurrent_requests,
                                       tracing.tracer(cfg.tracing, "igw-worker", tracer_provider))
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server()
        pb_grpc.add_WorkerServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server)
        if self.server.add_insecure_port(cfg.listen) == 0:
            raise SystemExit(f"worker: cannot listen on {cfg.listen} (worker.listen)")

    async def start(self) -> None:
        if self.cfg.metrics_listen:
            self.servicer.metrics.serve(self.cfg.metrics_listen)
        await self.server.start()
        for svc in ("", SERVICE_NAME):
            await self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        log.info("worker %s serving %s on %s", self.name, self.cfg.model_name, self.cfg.listen)

    async def drain(self) -> None:
        """NOT_SERVING so gateways stop sending, let running requests finish within
        the grace period, then stop (which aborts the rest)."""
        c = self.servicer.counters
        log.info("draining: up to %.0f s for %d active requests", self.cfg.drain_grace_s, c.active_requests)
        await self.health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.drain_grace_s
        while c.active_requests and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self.server.stop(grace=1.0)


async def serve(cfg: config_mod.WorkerConfig) -> None:
    engine = make_engine(cfg)
    t0 = time.monotonic()
    log.info("starting %s engine for model %s", engine.name, cfg.model_name)
    await engine.start()
    log.info("engine ready in %.1f s", time.monotonic() - t0)
    worker = WorkerServer(cfg, engine)
    await worker.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await worker.drain()
    await engine.close()
    log.info("worker stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="inference worker (inference.v1.Worker)")
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    parser.add_argument("--listen", help="override worker.listen")
    parser.add_argument("--engine", choices=["vllm", "synthetic"], help="override worker.engine")
    parser.add_argument("--name", help="override worker.name")
    parser.add_argument("--metrics-listen", help='override worker.metrics_listen ("" = off)')
    args = parser.parse_args(argv)
    cfg = config_mod.load_or_exit(args.config, "worker", listen=args.listen, engine=args.engine, name=args.name,
                                  metrics_listen=args.metrics_listen)
    setup_logging(component="worker", level=cfg.worker.log_level)
    try:
        asyncio.run(serve(cfg.worker))
    except config_mod.ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # vLLM spawns its engine core: keep this guard
    sys.exit(main())
