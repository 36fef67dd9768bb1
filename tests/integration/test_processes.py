"""Several gateway processes on one host behind one Envoy (gateway.processes), as igw-stack runs them."""

from __future__ import annotations

import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway.v1 import gateway_pb2 as gpb
from igw_common import config
from igw_common.config.gateway import replica_addresses
from tests.helpers import build_stack, free_port, make_config


def test_two_processes_share_the_load_behind_envoy(tmp_path):
    base = free_port()
    cfg = make_config(
        "synthetic",
        worker={"synthetic": {"tokens_per_s": 100}},
        gateway={
            "processes": 2,
            "listen": f"127.0.0.1:{base}",
            "metrics_listen": f"127.0.0.1:{free_port()}",
            "http_listen": "",
        },
    )
    # Process i listens on the configured ports + i: keep the +1 ports free of anything else.
    s = build_stack(tmp_path, cfg)
    try:
        s.start_worker()
        s.start_gateways()
        s.start_envoy()
        assert set(s.procs) >= {"gateway", "gateway-1"}
        stub = s.gateway_stub("envoy")
        req = gpb.ExecuteRequest(task="go", sampling=gpb.SamplingParams(max_tokens=20))
        with ThreadPoolExecutor(8) as ex:
            outs = list(ex.map(lambda _: list(stub.Execute(req, timeout=30)), range(16)))
        assert all(o[-1].done.usage.completion_tokens == 20 for o in outs)
        served = []
        for addr in replica_addresses(cfg["gateway"]["metrics_listen"], 2):
            text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
            served.append(
                sum(float(v) for v in re.findall(r'^igw_requests_total\{[^}]*code="OK"[^}]*\} (\S+)', text, re.M))
            )
        assert sum(served) == 16 and min(served) > 0, served  # Envoy spread them over both processes
    finally:
        s.stop()


def test_processes_need_a_shared_quota_store_when_quotas_apply():
    assert config.parse({"gateway": {"processes": 4}}).gateway.processes == 4  # no quotas at all: fine
    with pytest.raises(config.ConfigError) as info:
        config.parse({"gateway": {"processes": 2, "quota": {"default_tenant_limits": {"requests_per_minute": 5}}}})
    assert "gateway.processes" in str(info.value) and "gateway.quota.store" in str(info.value)
    ok = config.parse(
        {"gateway": {"processes": 2, "auth": {"mode": "api_key", "key_file": "k.yaml"}, "quota": {"store": "redis"}}}
    )
    assert ok.gateway.processes == 2
