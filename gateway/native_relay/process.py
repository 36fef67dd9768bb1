"""The native relay's process: started by its gateway process, started again when it exits.

Its life is its control link's (it ignores SIGINT and SIGTERM and exits when the link closes), so a drain
closes the link once the relay's calls are done, and a gateway that dies, however it dies, takes its
relay with it. Its stderr lines go to the gateway's log.

It is spawned with ``subprocess`` (posix_spawn or vfork), never a plain fork: a fork of this process runs
gRPC's fork handlers in the child, which once aborted it (c-ares, ``Check failed: channel_``) before it
could exec the relay.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import threading
from pathlib import Path

from gateway.errors import clip
from igw_common.config import GatewayConfig

log = logging.getLogger("gateway.native_relay")

BUILT = Path(__file__).resolve().parents[2] / "native" / "relay" / "build" / "native_relay"
_MAX_BACKOFF_S = 10.0
# A relay that ran this long before it exited was up: the next one starts after the first backoff again.
_STABLE_S = 30.0


def binary_path(cfg: GatewayConfig) -> Path:
    """The relay executable, or SystemExit naming the key when there is none."""
    path = Path(cfg.native_relay.binary) if cfg.native_relay.binary else BUILT
    if not path.is_file():
        hint = "`make native` builds it" if path == BUILT else "set it to the relay `make native` builds"
        raise SystemExit(f"gateway: gateway.native_relay.binary: {path} does not exist ({hint})")
    return path


class RelayProcess:
    def __init__(self, cfg: GatewayConfig, socket_path: str):
        self.cmd = [
            str(binary_path(cfg)),
            "--listen",
            cfg.native_relay.listen,
            "--core-socket",
            socket_path,
            "--max-request-bytes",
            str(cfg.limits.max_request_bytes),
            "--report-interval-ms",
            str(cfg.native_relay.report_interval_ms),
            "--min-ping-interval-ms",
            str(cfg.min_ping_interval_ms),
            "--core-timeout-ms",
            str(cfg.native_relay.core_timeout_ms),
        ]
        self.first_backoff_s = cfg.native_relay.restart_backoff_ms / 1000
        self.last_lines: list[str] = []  # its last stderr lines, for a start that fails
        self._proc: subprocess.Popen | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.exited = asyncio.Event()  # set while no relay runs

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="native relay")

    async def stop(self, timeout_s: float) -> None:
        """After the link was closed: the relay exits by itself; killed after ``timeout_s``."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                await asyncio.to_thread(proc.wait, timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = self.first_backoff_s
        while True:
            started = loop.time()
            self.exited.clear()
            # close_fds=False lets subprocess use posix_spawn; this process's own descriptors are
            # close-on-exec (PEP 446), so the relay inherits none of them.
            self._proc = proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, close_fds=False
            )
            threading.Thread(target=self._log_lines, args=(proc.stderr,), daemon=True, name="relay log").start()
            code = await asyncio.to_thread(proc.wait)
            self.exited.set()
            if self._stopping:
                return
            if loop.time() - started > _STABLE_S:
                backoff = self.first_backoff_s
            log.error(
                "native relay exited (status %s; its last lines: %s); starting it again in %.1f s",
                code,
                " | ".join(self.last_lines) or "none",
                backoff,
            )
            self.last_lines = []
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

    def _log_lines(self, stream) -> None:
        for raw in stream:
            line = clip(raw.decode(errors="replace").rstrip(), 500)
            self.last_lines = [*self.last_lines[-4:], line]
            log.info("native relay: %s", line.removeprefix("native relay: "))
