"""Fixtures that run the real processes on loopback (built from ``tests.helpers``).

- ``vllm_stack``: a real vLLM CPU worker serving the embedded SmolLM2 model,
  a gateway and Envoy. Loading vLLM takes about a minute on 2 cores, so one
  stack is shared by the whole test session.
- ``synthetic_stack``: the same with the synthetic engine, for fast fault tests.
- ``stock_vllm_grpc``: vLLM's own gRPC server (vllm_engine.proto) with the embedded model, shared by the
  session (it takes a few minutes to start on 2 cores); its address is ``.worker``.
- ``redis_server``: one real redis-server for the session.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import RedisServer, build_stack, make_config, running_stack


@pytest.fixture(scope="session")
def vllm_stack(tmp_path_factory):
    # Sessions on, as in config/default.yaml: stored responses (previous_response_id) are served.
    cfg = make_config("vllm", gateway={"sessions": {"enabled": True}})
    with running_stack(tmp_path_factory.mktemp("vllm-stack"), cfg) as s:
        yield s


@pytest.fixture(scope="module")
def synthetic_stack(tmp_path_factory):
    cfg = make_config("synthetic", worker={"synthetic": {"tokens_per_s": 50}})
    with running_stack(tmp_path_factory.mktemp("synthetic-stack"), cfg) as s:
        yield s


@pytest.fixture(scope="session")
def stock_vllm_grpc(tmp_path_factory):
    """A stock vLLM gRPC server, publishing its KV-cache events (``kv_events_endpoint``, an ipc socket)."""
    folder = tmp_path_factory.mktemp("vllm-grpc-stock")
    s = build_stack(folder, make_config("vllm"))
    s.kv_events_endpoint = f"ipc://{folder}/kv-events"
    kv = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": s.kv_events_endpoint, "topic": "kv"}
    try:
        s.start_vllm_grpc(engine="vllm", extra_args=["--kv-events-config", json.dumps(kv)])
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    r = RedisServer(tmp_path_factory.mktemp("redis"))
    r.start()
    yield r
    r.stop()
