"""The inference worker process: a grpc.aio server around one engine adapter.

Wiring only: the engine (``inference.vllm_engine`` or
``inference.synthetic_engine``), the ``inference.v1.Worker`` service
(``inference.service``, sessions in ``inference.session``), health,
reflection, metrics, signals and drain.

Run: ``igw-worker --config config.yaml`` (or ``python -m inference.server``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from igw_common import config as config_mod
from igw_common import tracing
from igw_common.logs import setup_logging
from igw_worker_api.v1 import worker_pb2 as pb
from igw_worker_api.v1 import worker_pb2_grpc as pb_grpc
from inference.engine import Engine
from inference.service import WorkerServicer

log = logging.getLogger("inference.worker")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Worker"].full_name


def server_options(cfg: config_mod.WorkerConfig) -> list[tuple[str, int]]:
    return [
        # Gateways ping their sessions (also quiet ones, e.g. during a long prefill); permit it, or gRPC
        # answers GOAWAY too_many_pings and every stream of that gateway is cut.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", cfg.min_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", 0),
        # Larger than the largest Submit a gateway builds from a request it admits.
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
    ]


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
        self.servicer = WorkerServicer(
            engine,
            self.name,
            cfg.max_concurrent_requests,
            tracing.tracer(cfg.tracing, "igw-worker", tracer_provider),
            max_message_bytes=cfg.max_message_bytes,
        )
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(options=server_options(cfg))
        pb_grpc.add_WorkerServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
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
    cfg = config_mod.load_or_exit(
        args.config,
        "worker",
        listen=args.listen,
        engine=args.engine,
        name=args.name,
        metrics_listen=args.metrics_listen,
    )
    setup_logging(component="worker", level=cfg.worker.log_level)
    try:
        asyncio.run(serve(cfg.worker))
    except config_mod.ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # vLLM spawns its engine core: keep this guard
    sys.exit(main())
