"""Starts this gateway process's native relay and its link, and drains them."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from gateway.core.request_core import RequestCore
from gateway.native_relay.calls import RelayCalls
from gateway.native_relay.link import Link
from gateway.native_relay.process import RelayProcess
from gateway.native_relay.v0 import control_pb2 as cpb
from igw_common.config import GatewayConfig

log = logging.getLogger("gateway.native_relay")

# How long a starting gateway waits for its relay to connect before it gives up with the relay's words.
START_TIMEOUT_S = 30.0


class NativeRelay:
    def __init__(self, cfg: GatewayConfig, core: RequestCore, link: Link):
        self.cfg = cfg
        self.link = link
        self.calls = RelayCalls(core, link)
        link.on_opened, link.on_closed = self.calls.opened, self.calls.closed
        link.on_stats = self._on_stats
        self._metrics = core.metrics
        # A directory only this user can enter: nobody else can connect to the socket or replace it.
        self._dir = Path(tempfile.mkdtemp(prefix="igw-relay-"))
        self.process = RelayProcess(cfg, str(self._dir / "core.sock"))

    async def start(self, on_health: Callable[[bool], None]) -> None:
        """The socket, then the relay; returns once it is attached (SystemExit with its words if it exits
        first). ``on_health`` hears whenever a relay attaches (True) or goes away (False)."""
        await self.link.listen(str(self._dir / "core.sock"))
        self.process.start()
        attached = asyncio.create_task(self.link.attached.wait())
        exited = asyncio.create_task(self.process.exited.wait())
        await asyncio.wait({attached, exited}, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        attached.cancel()
        exited.cancel()
        if not self.link.attached.is_set():
            await self.process.stop(0)
            words = "; ".join(self.process.last_lines) or f"it did not connect within {START_TIMEOUT_S:.0f} s"
            raise SystemExit(f"gateway: the native relay (gateway.native_relay) did not start: {words}")

        def on_detached() -> None:
            self.calls.abandon_all()
            on_health(False)

        self.link.on_detached = on_detached
        self.link.on_attached = lambda: on_health(True)
        on_health(True)
        log.info("native relay serving Execute on %s", self.cfg.native_relay.listen)

    def _on_stats(self, stats: cpb.RelayStats) -> None:
        m = self._metrics
        m.relay_calls.set(stats.calls)
        m.relay_bound_requests.set(stats.bound_requests)
        m.relay_worker_streams.set(stats.worker_streams)
        m.relay_resident_bytes.set(stats.resident_bytes)

    async def drain(self, grace_s: float) -> None:
        """New calls are refused (UNAVAILABLE: Envoy tries another replica); open ones get ``grace_s``;
        then the link closes, the relay ends what is left and exits."""
        self.calls.refusing = True
        await self.calls.wait_idle(grace_s)
        await self.link.close()
        await self.process.stop(5.0)
        shutil.rmtree(self._dir, ignore_errors=True)
