"""Canary and blue-green pools: 2 gateways behind Envoy, 2 pools of synthetic workers."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import yaml

from gateway.v1 import gateway_pb2 as gpb
from tests.helpers import build_stack, free_port, make_config, set_replicas


@pytest.fixture
def pools(tmp_path):
    """Pools a (stable / blue) and b (canary / green), one synthetic worker each; 2 gateways; Envoy."""
    a, b = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    g2 = f"127.0.0.1:{free_port()}"
    cfg = make_config(
        "synthetic",
        worker={"synthetic": {"tokens_per_s": 200}, "max_concurrent_requests": 256},
        gateway={
            "pools": [
                {"name": "a", "weight": 90, "workers": [{"address": a}]},
                {"name": "b", "weight": 10, "workers": [{"address": b}]},
            ],
            "pool_affinity": "session",
        },
        envoy={"health_check_interval_ms": 500},
    )
    set_replicas(cfg, [cfg["gateway"]["listen"], g2])
    s = build_stack(tmp_path, cfg)
    try:
        s.start_worker("worker_a", a)
        s.start_worker("worker_b", b)
        s.start_gateway("gateway0", cfg["gateway"]["listen"])
        s.start_gateway("gateway1", g2)
        s.start_envoy()
        yield s, {a: "a", b: "b"}
    finally:
        s.stop()


def set_weights(s, a: int, b: int) -> None:
    s.config["gateway"]["pools"][0]["weight"] = a
    s.config["gateway"]["pools"][1]["weight"] = b
    s.config_path.write_text(yaml.safe_dump(s.config))
    for name in ("gateway0", "gateway1"):
        s.procs[name].send_signal(signal.SIGHUP)


def one(stub, session, max_tokens=1):
    out = list(
        stub.Execute(
            gpb.ExecuteRequest(task="hi", session_id=session, sampling=gpb.SamplingParams(max_tokens=max_tokens)),
            timeout=30,
        )
    )
    assert out[-1].done.usage.completion_tokens == max_tokens
    return out[0].started.worker


def load_during(stub, pool_of, prefix, max_tokens, change, before_s=1.5, after_s=3.0):
    """8 clients stream continuously; ``change()`` runs in the middle. Returns (results, time of change):
    results are (ok|error, pool or message, completion time)."""
    stop, results, lock = threading.Event(), [], threading.Lock()

    def load(k):
        i = 0
        while not stop.is_set():
            try:
                w = one(stub, f"{prefix}-{k}-{i}", max_tokens=max_tokens)
                r = ("ok", pool_of[w], time.monotonic())
            except (grpc.RpcError, AssertionError) as err:
                r = ("error", str(err), time.monotonic())
            with lock:
                results.append(r)
            i += 1

    with ThreadPoolExecutor(8) as ex:
        fs = [ex.submit(load, k) for k in range(8)]
        time.sleep(before_s)
        t_change = time.monotonic()
        change()
        time.sleep(after_s)
        stop.set()
        for f in fs:
            f.result()
    return results, t_change


def test_weighted_split_stickiness_and_live_reweighting(pools):
    s, pool_of = pools
    stub = s.gateway_stub("envoy")
    with ThreadPoolExecutor(16) as ex:
        workers = list(ex.map(lambda i: one(stub, f"user-{i}"), range(1000)))
    share_b = sum(pool_of[w] == "b" for w in workers) / len(workers)
    print(f"canary share over 1000 sessions at 90/10: {share_b:.3f}")
    # Binomial sd at n=1000, p=0.1 is 0.0095: 3 sd either side.
    assert 0.07 <= share_b <= 0.13
    # Sticky: a session stays in its pool (whichever gateway replica Envoy picks).
    for i in range(20):
        assert {pool_of[one(stub, f"user-{i}")] for _ in range(5)} == {pool_of[workers[i]]}

    # Reweight to 50/50 in the middle of continuous load: no stream is lost.
    results, t_change = load_during(stub, pool_of, "live", 10, lambda: set_weights(s, 50, 50))
    assert [r for r in results if r[0] != "ok"] == []
    after = [r[1] for r in results if r[2] > t_change + 0.5]
    assert len(after) > 100
    assert 0.35 <= after.count("b") / len(after) <= 0.65


def test_blue_green_switch_under_load(pools):
    s, pool_of = pools
    set_weights(s, 100, 0)  # all blue (a)
    time.sleep(0.5)
    stub = s.gateway_stub("envoy")
    assert {pool_of[one(stub, f"pre-{i}")] for i in range(30)} == {"a"}
    # 40 tokens = 0.2 s streams: some are in flight at the switch.
    results, t_switch = load_during(stub, pool_of, "bg", 40, lambda: set_weights(s, 0, 100), after_s=2.5)
    assert [r for r in results if r[0] != "ok"] == []  # zero failed streams
    assert {r[1] for r in results if r[2] < t_switch} == {"a"}
    assert {r[1] for r in results if r[2] > t_switch + 0.8} == {"b"}


def test_tenant_affinity_keeps_each_tenant_on_one_pool(tmp_path):
    from gateway.core.keys import KeyEntry, KeyFile, hash_key, new_key, write_key_file

    keys, kf = {}, KeyFile()
    for i in range(30):
        key_id, key = new_key()
        kf.keys[key_id] = KeyEntry(sha256=hash_key(key), tenant=f"tenant-{i}")
        keys[f"tenant-{i}"] = key
    write_key_file(tmp_path / "keys.yaml", kf)
    a, b = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    cfg = make_config(
        "synthetic",
        worker={"synthetic": {"tokens_per_s": 500}},
        gateway={
            "pools": [
                {"name": "a", "weight": 50, "workers": [{"address": a}]},
                {"name": "b", "weight": 50, "workers": [{"address": b}]},
            ],
            "pool_affinity": "tenant",
            "auth": {"mode": "api_key", "key_file": str(tmp_path / "keys.yaml")},
        },
    )
    s = build_stack(tmp_path, cfg)
    try:
        s.start_worker("worker_a", a)
        s.start_worker("worker_b", b)
        s.start_gateway()
        stub = s.gateway_stub("gateway")
        pool_of = {a: "a", b: "b"}
        per_tenant = {}
        for tenant, key in keys.items():
            pools = set()
            for j in range(3):  # different sessions: the tenant, not the session, decides
                out = list(
                    stub.Execute(
                        gpb.ExecuteRequest(
                            task="hi", session_id=f"{tenant}-{j}", sampling=gpb.SamplingParams(max_tokens=1)
                        ),
                        metadata=[("authorization", f"Bearer {key}")],
                        timeout=30,
                    )
                )
                pools.add(pool_of[out[0].started.worker])
            assert len(pools) == 1, (tenant, pools)
            per_tenant[tenant] = pools.pop()
        assert set(per_tenant.values()) == {"a", "b"}  # 30 tenants at 50/50 use both pools
    finally:
        s.stop()
