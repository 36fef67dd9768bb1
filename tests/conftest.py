"""Fixtures that run the real processes on loopback.

- ``vllm_stack``: a real vLLM CPU worker serving the embedded SmolLM2 model,
  a gateway and Envoy. Loading vLLM takes about a minute on 2 cores, so one
  stack is shared by the whole test session.
- ``synthetic_stack``: the same with the synthetic engine, for fast fault tests.
Each process logs to a file under the test's temporary directory; when a
process fails to come up, the tail of its log is in the error.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml

from gateway import stack
from gateway.stack import free_port
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from inference.v1 import worker_pb2 as wpb
from inference.v1 import worker_pb2_grpc as wpb_grpc

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
        "gateway": {"listen": f"127.0.0.1:{free_port()}", "drain_grace_s": 5,
                    "metrics_listen": f"127.0.0.1:{free_port()}"},
        "worker": {"listen": f"127.0.0.1:{free_port()}", "engine": engine, "drain_grace_s": 5,
                   "metrics_listen": f"127.0.0.1:{free_port()}",
                   "vllm": {"max_model_len": 2048, "kv_cache_space_gib": 1}},
        "envoy": {"listen": f"127.0.0.1:{free_port()}", "admin_listen": f"127.0.0.1:{free_port()}"},
    }
    cfg["gateway"]["workers"] = [{"address": cfg["worker"]["listen"]}]
    for section, values in overrides.items():
        cfg[section] = _merge(cfg.get(section, {}), values)
    return cfg


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


@pytest.fixture(scope="session")
def vllm_stack(tmp_path_factory):
    s = build_stack(tmp_path_factory.mktemp("vllm-stack"), make_config("vllm"))
    try:
        s.start_worker()
        s.start_gateway()
        s.start_envoy()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def synthetic_stack(tmp_path_factory):
    cfg = make_config("synthetic", worker={"synthetic": {"tokens_per_s": 50}})
    s = build_stack(tmp_path_factory.mktemp("synthetic-stack"), cfg)
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
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), *self.args], stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT)
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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    r = RedisServer(tmp_path_factory.mktemp("redis"))
    r.start()
    yield r
    r.stop()
