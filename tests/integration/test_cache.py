"""The response cache against a real redis-server, two gateway processes and the synthetic engine: hits stream
like misses, never cross tenants, can be bypassed, single-flight identical misses (within a gateway and
across two), are charged as configured; and the in-process store of the embedded default."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway.v1 import gateway_pb2 as gpb
from tests.helpers import build_stack, igw_keys, make_config, new_key, quota
from tests.integration.test_http_api import raw
from tests.state_helpers import ask, greedy, log_lines, scrape, start_replica, value

TASK = "write a haiku about caching"


@pytest.fixture(scope="module")
def cached(tmp_path_factory, redis_server):
    """A synthetic worker (20 tokens/s: a 10-token answer takes 0.5 s) and two gateways sharing Redis."""
    redis_server.flush()
    tmp = tmp_path_factory.mktemp("cache")
    keys = tmp / "keys.yaml"
    igw_keys("tenant", "--file", str(keys), "unused")
    cfg = make_config(
        "synthetic",
        worker={"synthetic": {"tokens_per_s": 20}},
        gateway={
            "auth": {"mode": "api_key", "key_file": str(keys), "reload_interval_s": 0.2},
            "quota": {"store": "redis", "redis_url": redis_server.url},
            "cache": {"enabled": True, "store": "redis", "single_flight_wait_ms": 10_000},
            "pricing": {
                "models": [{"model": "smollm2-135m-instruct", "input_per_million": 1.0, "output_per_million": 2.0}]
            },
        },
    )
    s = build_stack(tmp, cfg)
    s.start_worker()
    s.start_gateway()
    s.start_envoy()
    other = start_replica(s, "gateway-b")
    yield s, keys, other
    s.stop()


def test_hit_streams_like_the_miss_and_is_marked(cached):
    s, keys, other = cached
    key = new_key(keys, "t-hit")
    stub = s.gateway_stub("gateway")
    miss = ask(stub, key, task=TASK, sampling=greedy(10))
    hit = ask(stub, key, task=TASK, sampling=greedy(10))
    assert not miss.done.cache_hit and miss.started.worker != "cache"
    assert hit.done.cache_hit and hit.started.worker == "cache"
    # The same answer, delta for delta, with the same usage and token counts.
    assert hit.text == miss.text and hit.deltas == miss.deltas
    assert hit.tokens == hit.done.usage.completion_tokens == miss.done.usage.completion_tokens == 10
    assert hit.done.usage.prompt_tokens == miss.done.usage.prompt_tokens == miss.started.prompt_tokens
    assert hit.done.finish_reason == miss.done.finish_reason
    # Priced: the miss costs its tokens; a hit costs nothing under hit_charge "request" (the default).
    pt = miss.done.usage.prompt_tokens
    assert miss.done.cost_micros == pt * 1 + 10 * 2
    assert hit.done.cost_micros == 0
    # A hit needs no worker: it is much faster than generating 10 tokens at 20/s.
    assert miss.total_s > 0.45 and hit.total_s < miss.total_s / 2, (miss.total_s, hit.total_s)
    # The other replica shares the Redis store: a hit there too.
    again = ask(other.stub(), key, task=TASK, sampling=greedy(10))
    assert again.done.cache_hit and again.text == miss.text
    # The request log line says hit or miss, with the cost.
    lines = [x for x in log_lines(s.log("gateway")) if x.get("key_id") == key.split("_")[1]]
    assert [x.get("cache") for x in lines[-2:]] == ["miss", "hit"]
    assert lines[-2]["cost_micros"] == miss.done.cost_micros and lines[-1]["cost_micros"] == 0


def test_only_deterministic_requests_are_cached_and_a_client_can_bypass(cached):
    s, keys, _ = cached
    key = new_key(keys, "t-eligible")
    stub = s.gateway_stub("gateway")
    # Temperature unset (1.0): sampled, never cached.
    for _ in range(2):
        assert not ask(stub, key, task=TASK, sampling=gpb.SamplingParams(max_tokens=3)).done.cache_hit
    # A fixed seed makes it deterministic.
    seeded = gpb.SamplingParams(max_tokens=3, temperature=0.8, seed=7)
    assert not ask(stub, key, task=TASK, sampling=seeded).done.cache_hit
    assert ask(stub, key, task=TASK, sampling=seeded).done.cache_hit
    # Another seed, max_tokens or stop is another key.
    assert not ask(
        stub, key, task=TASK, sampling=gpb.SamplingParams(max_tokens=3, temperature=0.8, seed=8)
    ).done.cache_hit
    assert not ask(stub, key, task=TASK, sampling=greedy(3, stop=["zz"])).done.cache_hit
    assert ask(stub, key, task=TASK, sampling=greedy(3, stop=["zz"])).done.cache_hit
    # Bypass: neither read nor written.
    assert not ask(stub, key, task=TASK, sampling=greedy(3, stop=["zz"]), cache_bypass=True).done.cache_hit
    assert not ask(stub, key, task=TASK + "!", sampling=greedy(3), cache_bypass=True).done.cache_hit
    assert not ask(stub, key, task=TASK + "!", sampling=greedy(3)).done.cache_hit


def test_hits_never_cross_tenants(cached):
    s, keys, _ = cached
    a, a2, b = new_key(keys, "t-alpha"), new_key(keys, "t-alpha"), new_key(keys, "t-beta")
    stub = s.gateway_stub("gateway")
    first = ask(stub, a, task="tenant secret prompt", sampling=greedy(4))
    assert not first.done.cache_hit
    # Another key of the same tenant shares the tenant's cache; another tenant never sees it.
    assert ask(stub, a2, task="tenant secret prompt", sampling=greedy(4)).done.cache_hit
    assert not ask(stub, b, task="tenant secret prompt", sampling=greedy(4)).done.cache_hit
    assert ask(stub, b, task="tenant secret prompt", sampling=greedy(4)).done.cache_hit


def _burst(stubs, key, n, **fields):
    barrier = threading.Barrier(n)

    def one(i):
        barrier.wait()
        return ask(stubs[i % len(stubs)], key, **fields)

    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(one, range(n)))


@pytest.mark.parametrize("where", ["one gateway", "two gateways"])
def test_identical_misses_generate_once(cached, where):
    s, keys, other = cached
    key = new_key(keys, "t-flight-" + where.split()[0])
    stubs = [s.gateway_stub("gateway")] + ([other.stub()] if where == "two gateways" else [])
    before = [scrape(s.config["gateway"]["metrics_listen"]), scrape(other.metrics)]
    answers = _burst(stubs, key, 6, task=f"single flight {where}", sampling=greedy(10))
    generated = [a for a in answers if not a.done.cache_hit]
    assert len(generated) == 1, [a.done.cache_hit for a in answers]
    assert {a.text for a in answers} == {generated[0].text}
    assert all(a.tokens == 10 for a in answers)
    # The waiters were served as soon as the one generation ended, not after generating themselves.
    assert max(a.total_s for a in answers) < generated[0].total_s + 1.0
    after = [scrape(s.config["gateway"]["metrics_listen"]), scrape(other.metrics)]
    hits = sum(value(a, "igw_cache_hits_total") - value(b, "igw_cache_hits_total") for a, b in zip(after, before))
    misses = sum(value(a, "igw_cache_misses_total") - value(b, "igw_cache_misses_total") for a, b in zip(after, before))
    assert (hits, misses) == (5, 1)


def test_a_failed_leader_lets_a_waiter_generate(cached):
    s, keys, _ = cached
    key = new_key(keys, "t-leader-fails")
    stub = s.gateway_stub("gateway")
    req = gpb.ExecuteRequest(task="leader fails", sampling=greedy(40))
    leader = stub.Execute(req, metadata=[("authorization", f"Bearer {key}")], timeout=60)
    next(leader)  # started: it generates
    waiter = {}
    t = threading.Thread(target=lambda: waiter.update(a=ask(stub, key, task="leader fails", sampling=greedy(40))))
    t.start()
    time.sleep(0.3)
    leader.cancel()  # nothing stored: the waiter must not wait for nothing
    t.join(30)
    assert not waiter["a"].done.cache_hit and waiter["a"].tokens == 40
    assert ask(stub, key, task="leader fails", sampling=greedy(40)).done.cache_hit


def test_hits_are_charged_as_configured(cached):
    s, keys, _ = cached
    key = new_key(keys, "t-charge", "--tpm", "100000")
    stub = s.gateway_stub("gateway")
    miss = ask(stub, key, task="charged?", sampling=greedy(10))
    time.sleep(0.3)  # the settle is written in the background
    left = quota(stub, key).budgets[0].tokens_available
    for _ in range(3):
        assert ask(stub, key, task="charged?", sampling=greedy(10)).done.cache_hit
    time.sleep(0.3)
    # hit_charge "request": hits cost no tokens (the bucket only refilled meanwhile).
    assert quota(stub, key).budgets[0].tokens_available >= left
    assert miss.done.usage.completion_tokens == 10


def test_http_door_hit_header_and_bypass(cached):
    s, keys, _ = cached
    key = new_key(keys, "t-http-cache")
    body = {"messages": [{"role": "user", "content": "http cache"}], "max_tokens": 4, "temperature": 0}
    auth = {"authorization": f"Bearer {key}"}
    status, h1, first = raw(s, "POST", "/v1/chat/completions", body, auth)
    assert status == 200 and "x-igw-cache" not in {k.lower() for k in h1}
    status, h2, second = raw(s, "POST", "/v1/chat/completions", body, auth)
    assert status == 200 and {k.lower(): v for k, v in h2.items()}["x-igw-cache"] == "hit"
    import json

    assert json.loads(second)["choices"] == json.loads(first)["choices"]
    status, h3, _ = raw(s, "POST", "/v1/chat/completions", body, {**auth, "x-igw-cache": "bypass"})
    assert status == 200 and "x-igw-cache" not in {k.lower() for k in h3}
    status, _, err = raw(s, "POST", "/v1/chat/completions", body, {**auth, "x-igw-cache": "please"})
    assert status == 400 and json.loads(err)["error"]["param"] == "x-igw-cache"


def test_in_process_store_of_the_embedded_default(tmp_path):
    """No Redis anywhere: store memory (the default), auth none; over max_entry_bytes nothing is stored."""
    cfg = make_config(
        "synthetic",
        worker={"synthetic": {"tokens_per_s": 200}},
        gateway={"cache": {"enabled": True, "max_entry_bytes": 400}},
    )
    s = build_stack(tmp_path, cfg)
    try:
        s.start_worker()
        s.start_gateway()
        stub = s.gateway_stub("gateway")
        assert not ask(stub, task="small", sampling=greedy(5)).done.cache_hit
        assert ask(stub, task="small", sampling=greedy(5)).done.cache_hit
        # ~6 bytes a token: 100 tokens do not fit in 400 bytes.
        assert not ask(stub, task="large", sampling=greedy(100)).done.cache_hit
        assert not ask(stub, task="large", sampling=greedy(100)).done.cache_hit
        m = scrape(s.config["gateway"]["metrics_listen"])
        assert value(m, "igw_cache_evictions_total", reason="too_large") == 2
        assert 0 < value(m, "igw_cache_memory_bytes") <= 400
        assert value(m, "igw_cache_bytes_total", direction="served") > 0
    finally:
        s.stop()
