"""Gateway process wiring: gRPC server, health, reflection, signals, drain.

Run: ``igw-gateway --config config.yaml`` (or ``python -m gateway.server``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.core.auth import Authenticator
from gateway.core.placement import Placement
from gateway.core.request_core import RequestCore
from gateway.core.scheduler import Scheduler
from gateway.doors import grpc_service as service_mod
from gateway.doors.grpc_service import GatewayService
from gateway.doors.http_server import HttpApi
from gateway.doors.job_runner import JobRunner
from gateway.doors.jobs import JobService
from gateway.metrics import GatewayMetrics, PoolCollector
from gateway.native_relay import HEALTH_SERVICE as NATIVE_RELAY_HEALTH
from gateway.state.cache import ResponseCache
from gateway.state.jobs import JobQueue
from gateway.state.quota import Pricing, Quotas
from gateway.state.sessions import Sessions
from gateway.v1 import gateway_pb2 as gpb
from gateway.vocabulary import PRIORITIES
from gateway.workers.membership import WorkerSet
from igw_common import config as config_mod
from igw_common import tracing
from igw_common.logs import setup_logging

log = logging.getLogger("gateway.server")

SERVICE_NAME = gpb.DESCRIPTOR.services_by_name["Gateway"].full_name
HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def server_options(cfg: config_mod.GatewayConfig) -> list[tuple[str, int]]:
    return [
        # Let Envoy and clients keep idle HTTP/2 connections alive with pings.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", cfg.min_ping_interval_ms),
        # Never GOAWAY a peer for pinging: Envoy's keepalive was struck off even at 5x the permitted
        # interval (measured), and that cuts every stream of the connection. Clients reach only Envoy.
        ("grpc.http2.max_ping_strikes", 0),
        # The request size budget: larger requests get RESOURCE_EXHAUSTED before any work. Workers
        # accept more than the largest request this admits (worker.max_message_bytes).
        ("grpc.max_receive_message_length", cfg.limits.max_request_bytes),
    ]


def build_core(cfg: config_mod.GatewayConfig, tracer_provider=None) -> RequestCore:
    """Everything of a gateway but the network: the worker set, placement, auth, quotas, queue and
    the request core over them (the servicer tests build theirs here too)."""
    metrics = GatewayMetrics()
    relay_link = None
    if cfg.native_relay.enabled:
        from gateway.native_relay.link import Link

        relay_link = Link()
    workers = WorkerSet(cfg, metrics, relay_link)
    placement = Placement(workers, cfg.queue.affinity_entries, cfg.placement)
    quotas = Quotas(cfg.quota, on_store_failure=metrics.quota_store_failures.inc)
    scheduler = Scheduler(cfg.queue.max_queued, cfg.queue.drr_quantum_tokens, placement, cfg.queue.max_bypass_ms / 1000)
    # Whenever a worker frees room or (re)joins, the queue moves.
    workers.set_on_change(scheduler.pump)
    metrics.registry.register(PoolCollector(workers))
    metrics.queue_limit.set(cfg.queue.max_queued)
    for prio in PRIORITIES:
        metrics.queue_depth.labels(prio).set_function(lambda p=prio: scheduler.depth(p))
    cache = ResponseCache(cfg.cache, cfg.redis_url_for("cache"), metrics) if cfg.cache.enabled else None
    sessions = (
        Sessions(cfg.sessions, cfg.limits, cfg.redis_url_for("sessions"), metrics) if cfg.sessions.enabled else None
    )
    return RequestCore(
        cfg,
        workers,
        placement,
        Authenticator(cfg.auth),
        quotas,
        scheduler,
        metrics,
        tracing.tracer(cfg.tracing, "igw-gateway", tracer_provider),
        pricing=Pricing(cfg.pricing, cfg.pools),
        cache=cache,
        sessions=sessions,
    )


class GatewayServer:
    """The gateway's gRPC server and its pool; start() and drain() for tests and main."""

    def __init__(self, cfg: config_mod.GatewayConfig, tracer_provider=None):
        self.cfg = cfg
        self.core = core = build_core(cfg, tracer_provider)
        self.metrics, self.workers, self.placement = core.metrics, core.workers, core.placement
        self.auth, self.quotas, self.scheduler = core.auth, core.quotas, core.scheduler
        self.jobs: JobRunner | None = None
        jobs = None
        if cfg.jobs.enabled:
            queue = JobQueue(cfg, cfg.redis_url_for("jobs"))
            jobs = JobService(cfg, core, queue)
            self.jobs = JobRunner(cfg, core, queue, cfg.name or cfg.listen)
        self.service = GatewayService(cfg, self.core, jobs)
        self.http = HttpApi(cfg, self.core) if cfg.http_listen else None
        self.native = None
        if cfg.native_relay.enabled:
            from gateway.native_relay.relay import NativeRelay

            self.native = NativeRelay(cfg, core, core.workers.relay_link)
        self._watch: asyncio.Task | None = None
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(options=server_options(cfg))
        service_mod.add_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([SERVICE_NAME, HEALTH_NAME, reflection.SERVICE_NAME], self.server)
        self.port = self.server.add_insecure_port(cfg.listen)
        if self.port == 0:
            raise SystemExit(f"gateway: cannot listen on {cfg.listen} (gateway.listen)")

    async def start(self) -> None:
        if self.cfg.metrics_listen:
            self.metrics.serve(self.cfg.metrics_listen)
        self.workers.start()
        if self.auth.key_file is not None:
            self._watch = asyncio.create_task(self.auth.watch())
        await self.server.start()
        if self.jobs is not None:
            self.jobs.start()
        if self.http is not None:
            try:
                await self.http.start(self.cfg.http_listen)
            except OSError as err:
                raise SystemExit(
                    f"gateway: cannot listen on {self.cfg.http_listen} (gateway.http_listen): {err}"
                ) from None
        if self.native is not None:
            await self.native.start(self._relay_health)
        for svc in ("", SERVICE_NAME):
            await self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        log.info("gateway listening on %s, %d workers configured", self.cfg.listen, len(self.workers.workers))

    def _relay_health(self, attached: bool) -> None:
        """Envoy checks the native relay here: a gateway without its relay keeps its other RPCs, while
        Execute goes to replicas whose relay runs."""
        status = health_pb2.HealthCheckResponse.SERVING if attached else health_pb2.HealthCheckResponse.NOT_SERVING
        asyncio.get_running_loop().create_task(self.health.set(NATIVE_RELAY_HEALTH, status))

    async def drain(self) -> None:
        """NOT_SERVING first, still accepting calls until Envoy's health checks have
        seen it (drain_notice_s), then refuse new calls and let streams finish."""
        await self.health.enter_graceful_shutdown()
        http = self.http.drain(self.cfg.drain_notice_s, self.cfg.drain_grace_s) if self.http else asyncio.sleep(0)
        await asyncio.sleep(self.cfg.drain_notice_s)
        # Running jobs get the streams' grace too; what is left is given back to the queue for another gateway.
        jobs = self.jobs.drain(self.cfg.drain_grace_s) if self.jobs else asyncio.sleep(0)
        native = self.native.drain(self.cfg.drain_grace_s) if self.native else asyncio.sleep(0)
        await asyncio.gather(self.server.stop(grace=self.cfg.drain_grace_s), http, jobs, native)
        if self._watch:
            self._watch.cancel()
        await self.quotas.close()
        for state in (self.core.cache, self.core.sessions, self.jobs.q if self.jobs else None):
            if state is not None:
                await state.close()
        await self.workers.close()


def reload(gw: "GatewayServer", config_path: str | None) -> None:
    """SIGHUP: re-read the key file and the pools' weights (other changes need a restart)."""
    gw.auth.reload()
    if not config_path:
        return
    try:
        new = config_mod.load(config_path)
        gw.placement.set_weights({p.name: p.weight for p in new.gateway.pools})
    except (config_mod.ConfigError, ValueError) as err:
        log.error("config not reloaded, previous weights stay in force: %s", err)


async def serve(cfg: config_mod.GatewayConfig, config_path: str | None = None) -> None:
    try:
        gw = GatewayServer(cfg)
    except (OSError, ValueError) as err:  # e.g. an unreadable key file or edge secret
        raise SystemExit(f"gateway: cannot start: {err}") from None
    await gw.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload, gw, config_path)
    await stop.wait()
    log.info("draining: up to %.0f s for in-flight streams", cfg.drain_grace_s)
    await gw.drain()
    log.info("gateway stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="inference gateway (gateway.v1.Gateway)")
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    parser.add_argument("--listen", help="override gateway.listen")
    parser.add_argument("--worker", action="append", help="worker host:port (repeatable; overrides gateway.workers)")
    parser.add_argument("--metrics-listen", help='override gateway.metrics_listen ("" = off)')
    parser.add_argument("--http-listen", help='override gateway.http_listen ("" = off)')
    parser.add_argument("--native-relay-listen", help="override gateway.native_relay.listen")
    args = parser.parse_args(argv)
    workers = [{"address": a} for a in args.worker] if args.worker else None
    cfg = config_mod.load_or_exit(
        args.config,
        "gateway",
        listen=args.listen,
        workers=workers,
        metrics_listen=args.metrics_listen,
        http_listen=args.http_listen,
    )
    if args.native_relay_listen:  # process i of gateway.processes (igw-stack)
        relay = {**cfg.gateway.native_relay.model_dump(), "listen": args.native_relay_listen}
        try:
            cfg = config_mod.with_overrides(cfg, "gateway", native_relay=relay)
        except config_mod.ConfigError as err:
            raise SystemExit(str(err)) from None
    setup_logging(component="gateway", level=cfg.gateway.log_level)
    if cfg.gateway.event_loop == "uvloop":
        import uvloop  # ~18% more streamed tokens/s per core than asyncio's loop (docs/performance.md)

        uvloop.run(serve(cfg.gateway, args.config))
    else:
        asyncio.run(serve(cfg.gateway, args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
