"""Which workers exist: the static list and DNS discovery, in named pools, and the model catalog.

The worker set holds one connection per worker. Workers come from
``gateway.workers`` / ``gateway.worker_dns`` or, with weighted pools
(canary, blue-green), from each ``gateway.pools[]`` entry. A DNS name (e.g. a
Kubernetes headless Service) is re-resolved every
``gateway.worker_dns_refresh_s``; a worker that leaves DNS takes no new
requests and is closed once its streams end (within ``gateway.drain_grace_s``).

Which worker a request goes to is ``gateway.core.placement``'s business.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass

from gateway.errors import RpcError, clip, unavailable
from gateway.metrics import GatewayMetrics
from gateway.workers.connection import Connection
from gateway.workers.session_protocol import WorkerConnection
from igw_common.config import GatewayConfig, WorkerEndpoint

log = logging.getLogger("gateway.workers.membership")


@dataclass
class PoolSpec:
    """A named pool of workers (e.g. stable and canary) with a traffic weight."""

    name: str
    weight: int
    endpoints: list[WorkerEndpoint]
    dns: list[str]
    overflow: bool = False  # out of the weighted choice: only for requests the others cannot take in time


class WorkerSet:
    """All workers this gateway knows, in one or more weighted pools."""

    def __init__(self, cfg: GatewayConfig, metrics: GatewayMetrics | None = None, relay_link=None):
        self.cfg = cfg
        self.metrics = metrics
        # gateway.native_relay: the relay's control link, which carries our workers' Session streams.
        self.relay_link = relay_link
        self.specs = [
            PoolSpec(p.name, p.weight, list(p.workers), list(p.worker_dns), p.overflow) for p in cfg.pools
        ] or [PoolSpec("default", 100, list(cfg.workers), list(cfg.worker_dns))]
        # With DNS names configured, a pool's static list is only a starting point.
        self.workers = [self._connect(e, spec.name) for spec in self.specs if not spec.dns for e in spec.endpoints]
        self._on_change = lambda: None
        self._resolver: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._last_no_worker_log = 0.0

    def _connect(self, endpoint: WorkerEndpoint, pool: str) -> Connection:
        conn = self._connection(endpoint, pool)
        conn.overflow = any(spec.overflow for spec in self.specs if spec.name == pool)
        return conn

    def _connection(self, endpoint: WorkerEndpoint, pool: str) -> Connection:
        if endpoint.protocol == "openai-http":
            from gateway.workers.openai_http import OpenAIHttpConnection

            return OpenAIHttpConnection(endpoint, self.cfg, self.metrics, pool=pool)
        if endpoint.protocol == "vllm-grpc":
            from gateway.workers.vllm_grpc import VllmGrpcConnection

            return VllmGrpcConnection(
                endpoint.address,
                self.cfg,
                self.metrics,
                pool=pool,
                tokenizer=endpoint.tokenizer,
                max_concurrent_requests=endpoint.max_concurrent_requests,
                kv_events=(endpoint.kv_events_endpoint, endpoint.kv_events_topic),
            )
        if self.relay_link is not None:
            from gateway.workers.relayed_session import RelayedConnection

            return RelayedConnection(
                endpoint.address, self.cfg, self.metrics, pool=pool, tokenizer=endpoint.tokenizer, link=self.relay_link
            )
        return WorkerConnection(endpoint.address, self.cfg, self.metrics, pool=pool, tokenizer=endpoint.tokenizer)

    def set_on_change(self, callback) -> None:
        """``callback`` runs whenever a worker's room or readiness changes (the scheduler pumps)."""
        self._on_change = callback
        for w in self.workers:
            w.on_change = callback

    # --- discovery ---------------------------------------------------------------------

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
            static = {(spec.name, e.address) for spec in self.specs if not spec.dns for e in spec.endpoints}
            known = {(w.pool, w.address) for w in self.workers}
            for pool, addr in sorted(found - known):
                log.info("worker %s (pool %s) discovered by DNS", addr, pool)
                w = self._connect(WorkerEndpoint(address=addr), pool)  # DNS names lead to our workers
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

    async def _retire(self, w: Connection) -> None:
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

    # --- the model catalog ----------------------------------------------------------------

    def models(self) -> dict[str, list[Connection]]:
        """Model name -> workers serving it that take new requests (every model ever seen is a key)."""
        out: dict[str, list[Connection]] = {}
        for w in self.workers:
            if w.model is not None:
                serving = out.setdefault(w.model, [])
                if w.accepting:
                    serving.append(w)
        return out

    def default_model(self) -> str:
        if self.cfg.default_model:
            return self.cfg.default_model
        return next((w.model for w in self.workers if w.model is not None), "")

    def max_context_tokens(self, model: str) -> int | None:
        sizes = [w.max_context_tokens for w in self.workers if w.model == model]
        return min(sizes) if sizes else None

    def fill_in_middle(self, model: str) -> bool:
        """Every worker serving ``model`` can fill in the middle (requests may go to any of them)."""
        serving = [w for w in self.workers if w.model == model]
        return bool(serving) and all(w.fill_in_middle for w in serving)

    def all_reached(self) -> bool:
        """Every worker has been reached once (so the catalog is complete)."""
        return all(w.model is not None for w in self.workers)

    def can_serve(self, model: str, exclude=(), overflow: bool = True) -> bool:
        """Some worker serving the model takes new requests (it may be busy); ``overflow`` False: not counting
        the overflow pools'."""
        return any(w not in exclude and (overflow or not w.overflow) for w in self.models().get(model, []))

    def no_worker_error(self, model: str) -> RpcError:
        """UNAVAILABLE for the client (no internal addresses or exception text); the details go to the log."""
        relevant = [w for w in self.workers if not model or w.model is None or w.model == model]
        now = time.monotonic()
        if now - self._last_no_worker_log > 5:  # a flood of refused calls must not flood the log
            self._last_no_worker_log = now
            log.warning(
                "no worker for model %r: %s",
                clip(model, 64),
                "; ".join(f"{w.address}: {w.last_error}" for w in relevant) or "none configured",
            )
        what = f"serving model {model!r}" if model else "(so no default model is known yet)"
        return unavailable(
            f"no worker {what} is reachable right now ({len(relevant)} configured, "
            f"{sum(w.ready for w in relevant)} connected, none taking requests); retry shortly",
            retry_after_s=1.0,
        )
