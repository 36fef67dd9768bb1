"""What the tests share: real processes on loopback and the clients that talk to them.

- ``Stack`` / ``make_config`` / ``build_stack``: worker, gateway and Envoy processes from one config
  on free ports, each logging to a file in the test's directory (a process that fails to come up
  shows the tail of its log in the error).
- ``RedisServer``: a real redis-server on a free port.
- ``igw_keys`` runs the real ``igw-keys``; ``execute``/``quota`` call a gateway with a key.

Fixtures built on these live in ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import yaml

from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from igw_stack import launcher as stack
from igw_stack.launcher import free_port  # noqa: F401  (re-exported for tests)
from igw_worker_api.v1 import worker_pb2 as wpb
from igw_worker_api.v1 import worker_pb2_grpc as wpb_grpc

BIN = Path(sys.executable).parent
TASK = "count please"  # what execute() sends
PY = sys.executable


class Stack(stack.Processes):
    """The processes of one test, plus the raw config dict (tests edit and rewrite it) and clients."""

    def __init__(self, dir: Path, config_path: Path, config: dict):
        super().__init__(config_path, log_dir=dir)
        self.dir = dir
        self.config = config

    @property
    def worker(self) -> str:
        return self.config["worker"]["listen"]

    @property
    def gateway(self) -> str:
        return self.config["gateway"]["listen"]

    @property
    def envoy(self) -> str:
        return self.config["envoy"]["listen"]

    @property
    def envoy_admin(self) -> str:
        return self.config["envoy"]["admin_listen"]

    # --- clients -----------------------------------------------------------------

    def gateway_stub(self, via: str = "envoy") -> gpb_grpc.GatewayStub:
        """Through Envoy, straight to the gateway, or straight to its native relay (Execute only)."""
        if via == "relay":
            addr = self.config["gateway"]["native_relay"]["listen"]
        else:
            addr = self.envoy if via == "envoy" else self.gateway
        return gpb_grpc.GatewayStub(grpc.insecure_channel(addr))

    def worker_load(self, address: str | None = None) -> wpb.WorkerLoad:
        with grpc.insecure_channel(address or self.worker) as ch:
            return wpb_grpc.WorkerStub(ch).Load(wpb.LoadRequest(), timeout=5)

    def wait_worker_idle(self, timeout_s: float = 5.0) -> tuple[wpb.WorkerLoad, float]:
        """Poll until the worker and its engine have no request; returns (load, seconds waited)."""
        t0 = time.monotonic()
        while True:
            load = self.worker_load()
            if load.active_requests == 0 and load.engine_unfinished_requests == 0:
                return load, time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                return load, time.monotonic() - t0
            time.sleep(0.02)


def make_config(engine: str, **overrides) -> dict:
    cfg = {
        "gateway": {
            "listen": f"127.0.0.1:{free_port()}",
            "drain_grace_s": 5,
            "metrics_listen": f"127.0.0.1:{free_port()}",
            "http_listen": f"127.0.0.1:{free_port()}",
        },
        "worker": {
            "listen": f"127.0.0.1:{free_port()}",
            "engine": engine,
            "drain_grace_s": 5,
            "metrics_listen": f"127.0.0.1:{free_port()}",
            "vllm": {"max_model_len": 2048, "kv_cache_space_gib": 1},
        },
        "envoy": {"listen": f"127.0.0.1:{free_port()}", "admin_listen": f"127.0.0.1:{free_port()}"},
    }
    cfg["gateway"]["workers"] = [{"address": cfg["worker"]["listen"]}]
    if os.environ.get("IGW_TEST_NATIVE_RELAY") == "1":  # `make test-native`: the suite with the switch on
        cfg["gateway"]["native_relay"] = {"enabled": True, "listen": f"127.0.0.1:{free_port()}"}
    for section, values in overrides.items():
        cfg[section] = _merge(cfg.get(section, {}), values)
    return cfg


def set_replicas(cfg: dict, addresses: list[str]) -> None:
    """Envoy in front of gateway replicas on ``addresses`` (started with ``start_gateway(name, address)``),
    each with its own native relay when the switch is on."""
    cfg["envoy"]["upstreams"] = addresses
    if cfg["gateway"].get("native_relay", {}).get("enabled"):
        cfg["envoy"]["native_upstreams"] = [f"127.0.0.1:{free_port()}" for _ in addresses]


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_stack(tmp: Path, cfg: dict) -> Stack:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg["envoy"].setdefault("access_log_path", str(tmp / "envoy-access.log"))
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Stack(dir=tmp, config_path=path, config=cfg)


@contextlib.contextmanager
def running_stack(tmp: Path, cfg: dict):
    """Worker, gateway and Envoy up from ``cfg``; all stopped on the way out."""
    s = build_stack(tmp, cfg)
    try:
        s.start_worker()
        s.start_gateway()
        s.start_envoy()
        yield s
    finally:
        s.stop()


class RedisServer:
    """A real redis-server on a free loopback port, no persistence."""

    def __init__(self, dir: Path, *args: str):
        self.dir = dir
        self.args = args  # more redis-server options, e.g. "--replicaof", "127.0.0.1", "6379"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                *self.args,
            ],
            stdout=open(self.dir / "redis.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        import redis

        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                assert self.proc.poll() is None, stack.tail(self.dir / "redis.log")
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def flush(self) -> None:
        import redis

        redis.Redis(port=self.port).flushall()


def igw_keys(*args: str) -> str:
    r = subprocess.run([str(BIN / "igw-keys"), *args], capture_output=True, text=True, timeout=30, check=True)
    return r.stdout.strip()


def execute(stub, key, max_tokens=5, stop=()):
    req = gpb.ExecuteRequest(task=TASK, sampling=gpb.SamplingParams(max_tokens=max_tokens, stop=list(stop)))
    return list(stub.Execute(req, metadata=[("authorization", f"Bearer {key}")], timeout=60))


def quota(stub, key):
    return stub.GetQuota(gpb.GetQuotaRequest(), metadata=[("authorization", f"Bearer {key}")], timeout=5)


def gpb_stub(addr):
    from gateway.v1 import gateway_pb2_grpc

    return gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(addr))


def new_key(keys, tenant, *limits) -> str:
    key = igw_keys("issue", "--file", str(keys), "--tenant", tenant, *limits)
    time.sleep(0.6)  # every gateway's file watch (0.2 s) has seen it
    return key


class TcpProxy:
    """A loopback TCP relay in front of a server, to cut the network between two real processes and
    restore it (what a failed node or a broken link looks like to the gateway)."""

    def __init__(self, target: str):
        import socket
        import threading

        self._socket, self._threading = socket, threading
        self.target = target
        self.address = f"127.0.0.1:{free_port()}"
        self._listener = None
        self._conns: list = []
        self._lock = threading.Lock()

    def start(self) -> None:
        host, port = self.address.rsplit(":", 1)
        self._listener = self._socket.create_server((host, int(port)), reuse_port=True)
        self._threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener) -> None:
        host, port = self.target.rsplit(":", 1)
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = self._socket.create_connection((host, int(port)))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(self._socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Stop listening and reset every open connection: the server looks gone."""
        try:  # wakes the accept() blocked in the other thread; close() alone would leave it waiting
            self._listener.shutdown(self._socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.setsockopt(self._socket.SOL_SOCKET, self._socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()
            except OSError:
                pass


def wait_ready_workers(stub, n, timeout=10, key=None):
    """Until the gateway behind ``stub`` has ``n`` workers ready for its first model (a gateway reports
    SERVING before it has reached its workers)."""
    deadline = time.monotonic() + timeout
    md = [("authorization", f"Bearer {key}")] if key else None
    while True:
        models = stub.ListModels(gpb.ListModelsRequest(), metadata=md, timeout=5).models
        if models and models[0].ready_workers == n:
            return
        assert time.monotonic() < deadline, f"ready workers never reached {n}"
        time.sleep(0.05)
