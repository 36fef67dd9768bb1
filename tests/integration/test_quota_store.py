"""Quota reservations are settled or expire soon, whatever Redis does: real redis-servers (slow,
down, read-only replica, out of memory, a cluster node), the stores and the facade driven directly,
and gateway processes where the status a client sees matters."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import redis
import redis.asyncio as aioredis

from gateway.state.quota import Budget, Denied, LocalStore, Quotas, RedisStore, StoreUnavailable
from gateway.v1 import gateway_pb2 as gpb
from igw_common import config
from igw_common.config import QuotaConfig, QuotaLimits
from tests.helpers import RedisServer, build_stack, execute, free_port, gpb_stub, igw_keys, make_config, new_key, quota

LIMITS = QuotaLimits(requests_per_minute=10, tokens_per_minute=6_000, concurrent_streams=2)  # 100 tokens/s


def budgets(tenant: str = "acme", key: str = "k1", limits: QuotaLimits = LIMITS) -> list[Budget]:
    return [Budget("key", key, limits, tenant), Budget("tenant", tenant, limits)]


def levels(remaining) -> list[tuple[float, float, int]]:
    return [(r.requests_available, r.tokens_available, r.concurrent_in_use) for r in remaining]


async def eventually(fetch, predicate, timeout_s: float):
    """Poll the coroutine function ``fetch`` until ``predicate`` holds for what it returns, at most
    ``timeout_s``; returns the last value."""
    deadline = time.monotonic() + timeout_s
    while not predicate(value := await fetch()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return value


@pytest.fixture
def start_redis(tmp_path):
    """Start real redis-servers (``start(name, *options)``); all are stopped when the test ends."""
    started: list[RedisServer] = []

    def start(name: str, *args: str, cluster: bool = False) -> RedisServer:
        (tmp_path / name).mkdir()
        if cluster:
            args += ("--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / name / "nodes.conf"))
        r = RedisServer(tmp_path / name, *args)
        while cluster and r.port > 55_535:  # a cluster node's bus listens on port + 10000
            r.port = free_port()
        r.url = f"redis://127.0.0.1:{r.port}/0"
        started.append(r)
        r.start()
        return r

    yield start
    for r in reversed(started):
        r.stop()


@pytest.fixture
def redis_debug(start_redis):
    return start_redis("debug", "--enable-debug-command", "yes")


class Harness:
    """A Quotas facade on a Redis, plus a second, independent view of what Redis holds."""

    def __init__(self, url: str, **cfg):
        self.failures = 0
        cfg = {"store": "redis", "redis_url": url, "lease_ttl_s": 30, **cfg}
        self.q = Quotas(QuotaConfig(**cfg), on_store_failure=self._failed)
        self.truth = RedisStore(url, "igw:q:", 5.0)

    def _failed(self):
        self.failures += 1

    async def in_redis(self, bs=None):
        return levels(await self.truth.remaining(bs or budgets()))

    async def close(self):
        await self.q.close()
        await self.truth.close()


async def warm_up(h: Harness) -> None:
    """Scripts loaded and a connection open, so the next script is sent at once (not a SCRIPT LOAD or
    a connection handshake, which a sleeping Redis would never see)."""
    h.q.settle(await h.q.reserve(budgets(tenant="warm-up"), 1), 1)
    await asyncio.sleep(0.05)


async def slow_redis(r: RedisServer, seconds: float) -> asyncio.Task:
    """Make Redis unresponsive for real: DEBUG SLEEP blocks its one thread. Returns once Redis is
    asleep (a probe goes unanswered), so what the test sends next really waits."""
    client = aioredis.Redis(port=r.port)
    await client.ping()  # connected first: the sleep is one command on an open socket

    async def sleep():
        try:
            await client.execute_command("DEBUG", "SLEEP", str(seconds))
        finally:
            await client.aclose()

    task = asyncio.create_task(sleep())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        probe = aioredis.Redis(port=r.port)
        try:
            await asyncio.wait_for(probe.ping(), 0.02)
        except asyncio.TimeoutError:
            return task  # unanswered: asleep
        finally:
            await probe.aclose()
    raise AssertionError("Redis never went to sleep")


async def test_cancel_during_reserve_leaves_no_lease(redis_debug):
    h = Harness(redis_debug.url, redis_timeout_ms=3_000)
    try:
        await warm_up(h)
        sleeper = await slow_redis(redis_debug, 0.4)
        await asyncio.sleep(0.05)  # Redis is asleep: the script below is sent and waits in its socket
        caller = asyncio.create_task(h.q.reserve(budgets(), 600))
        await asyncio.sleep(0.1)
        caller.cancel()  # the client went away mid round trip
        with pytest.raises(asyncio.CancelledError):
            await caller
        await sleeper
        # The script ran once Redis woke up; what it charged is settled: no lease, all tokens back,
        # the request itself counted.
        state = await eventually(h.in_redis, lambda s: all(c == 0 and t > 5_990 for _, t, c in s), 3)
        assert all(c == 0 and t > 5_990 and 8.9 < r < 9.2 for r, t, c in state), state
        assert h.failures == 0
    finally:
        await h.close()


async def test_slow_call_that_runs_late_is_undone_fail_open(redis_debug):
    h = Harness(redis_debug.url, redis_timeout_ms=100, redis_retry_backoff_max_ms=200)
    try:
        await warm_up(h)
        sync = redis.Redis(port=redis_debug.port)
        zadds = lambda: sync.info("commandstats").get("cmdstat_zadd", {}).get("calls", 0)  # noqa: E731
        before = zadds()
        sleeper = await slow_redis(redis_debug, 0.6)
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        r = await h.q.reserve(budgets(), 600)
        # Fail open: admitted on this gateway's own limits within the timeout.
        assert r.store is h.q.local and time.monotonic() - t0 < 0.5
        assert h.failures >= 1
        await sleeper
        # Redis woke up and ran the reserve it had been sent: the call was slow, not lost (a lease on
        # each budget).
        assert zadds() - before == 2
        # The background undo takes it back: no lease, every token and the request returned, and a
        # tombstone for any copy of the reserve still in flight.
        record = f"igw:q:{{t:acme}}:res:{r.lease_id}"
        state = await eventually(
            h.in_redis, lambda s: s == [(10, 6_000, 0)] * 2 and sync.hget(record, "st") == b"undone", 3
        )
        assert state == [(10, 6_000, 0)] * 2, state
        h.q.settle(r, 0)  # the stream that ran on local limits ends
        await asyncio.sleep(0.05)
        assert [c for _, _, c in levels(await h.q.local.remaining(budgets()))] == [0, 0]
    finally:
        await h.close()


async def test_failed_refund_is_retried_until_redis_is_back(start_redis):
    r = start_redis("r")
    h = Harness(r.url, redis_timeout_ms=200, redis_retry_backoff_max_ms=300)
    try:
        res = await h.q.reserve(budgets(), 1_000)
        assert res.store is h.q.shared
        assert [c for _, _, c in await h.in_redis()] == [1, 1]
        redis.Redis(port=r.port).save()  # Redis comes back with its data, as after a restart
        r.stop()
        h.q.settle(res, 100)  # fails: nobody listens
        await asyncio.sleep(0.5)
        assert h.failures >= 1
        r.start()
        state = await eventually(h.in_redis, lambda s: s[0][2] == 0, 3)
        assert [c for _, _, c in state] == [0, 0], state  # the lease is released
        assert all(5_890 < t <= 6_000 for _, t, _ in state), state  # 900 of 1000 tokens refunded
    finally:
        await h.close()


async def test_settle_is_idempotent_and_trim_never_refunds_twice(redis_server):
    store = RedisStore(redis_server.url, "igw:q:", 2.0)
    try:
        bs = budgets(tenant="idem")
        await store.reserve(bs, 1_000, "lease-1", 30)
        for _ in range(3):  # e.g. a trim retried after a timeout that had in fact been written
            await store.adjust(bs, "lease-1", 600, end=False)
        (_, tokens, leases), _ = levels(await store.remaining(bs))
        assert 5_400 <= tokens < 5_420 and leases == 1
        for _ in range(2):
            await store.adjust(bs, "lease-1", 100, end=True)
        (_, tokens, leases), _ = levels(await store.remaining(bs))
        assert 5_900 <= tokens < 5_920 and leases == 0
    finally:
        await store.close()


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_store_errors_map_to_the_failure_mode(start_redis, mode):
    """READONLY (a replica after failover), OOM, NOSCRIPT: never an exception other than StoreUnavailable
    (closed) or Denied, and fail open admits on local limits."""
    primary = start_redis("p")
    replica = start_redis("r", "--replicaof", "127.0.0.1", str(primary.port))
    qs = []
    try:
        for url, breaker in ((replica.url, None), (primary.url, ("CONFIG", "SET", "maxmemory", "1"))):
            h = Harness(url, redis_failure_mode=mode)
            qs.append(h)
            if breaker:
                redis.Redis(port=primary.port).execute_command(*breaker)
            # No lease in the OOM case: a script's first write is then a denied one (a script that
            # has written once may go on writing under OOM).
            bs = budgets(limits=QuotaLimits(requests_per_minute=10, tokens_per_minute=100))
            for _ in range(2):
                if mode == "closed":
                    with pytest.raises(StoreUnavailable, match="READONLY|OOM"):
                        await h.q.reserve(bs, 10)
                else:
                    r = await h.q.reserve(bs, 10)
                    assert r.store is h.q.local
            assert h.failures >= 2
        redis.Redis(port=primary.port).execute_command("CONFIG", "SET", "maxmemory", "0")
        # NOSCRIPT (a Redis restarted or flushed its script cache): redis-py loads the script again.
        h = Harness(primary.url, redis_failure_mode=mode)
        qs.append(h)
        redis.Redis(port=primary.port).script_flush()
        r = await h.q.reserve(budgets(tenant="noscript"), 10)
        assert r.store is h.q.shared
        # A local-only limit still applies in fail open: 10 requests per minute.
        if mode == "open":
            h = Harness(replica.url, redis_failure_mode=mode)
            qs.append(h)
            for _ in range(10):
                await h.q.reserve(budgets(tenant="local", limits=QuotaLimits(requests_per_minute=10)), 1)
            with pytest.raises(Denied):
                await h.q.reserve(budgets(tenant="local", limits=QuotaLimits(requests_per_minute=10)), 1)
    finally:
        for h in qs:
            await h.close()


async def test_one_reserve_touches_one_hash_slot(start_redis):
    """On a Redis Cluster node a script whose keys span hash slots fails with CROSSSLOT: the key's and
    its tenant's budgets share the tenant's hash tag, so reserve, trim, settle and renew all run."""
    r = start_redis("cluster", cluster=True)
    sync = redis.Redis(port=r.port)
    sync.execute_command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
    deadline = time.monotonic() + 10
    while b"cluster_state:ok" not in sync.execute_command("CLUSTER", "INFO"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # The cluster rejects keys of two slots: what the old key layout ({key:..} and {tenant:..}) did.
    with pytest.raises(redis.exceptions.ClusterCrossSlotError):
        sync.mset({"{key:k1}:x": 1, "{tenant:acme}:x": 1})
    h = Harness(r.url, redis_failure_mode="closed", lease_ttl_s=0.6)
    try:
        res = await h.q.reserve(budgets(), 500)
        assert res.store is h.q.shared
        h.q.trim(res, 300)
        await asyncio.sleep(0.5)  # one renewal (every 0.2 s) went through too
        assert [c for _, _, c in await h.in_redis()] == [1, 1]
        h.q.settle(res, 100)
        state = await eventually(h.in_redis, lambda s: s[0][2] == 0, 2)
        assert all(c == 0 and t > 5_890 for _, t, c in state), state
        assert h.failures == 0
        # Were it to happen, it is a store failure like any other (the failure mode), not a crash.
        with pytest.raises(StoreUnavailable, match="CROSSSLOT") as info:
            await h.truth._call("remaining", ["{a}r", "{a}t", "{a}l", "{b}r", "{b}t", "{b}l"], [2, 1, 1, 1, 1])
        assert not info.value.maybe_applied
    finally:
        await h.close()


async def test_local_and_redis_stores_agree(redis_server):
    """One refill formula (Python in LocalStore, the Lua prelude in RedisStore): the same operations
    leave the same levels, admit and refuse the same requests with the same wait."""
    local, shared = LocalStore(), RedisStore(redis_server.url, "igw:parity:", 2.0)
    bs = budgets(
        tenant="parity", limits=QuotaLimits(requests_per_minute=5, tokens_per_minute=6_000, concurrent_streams=2)
    )
    ops = [
        ("reserve", "a", 2_500),
        ("reserve", "b", 2_000),
        ("adjust", "a", 1_500, False),
        ("reserve", "c", 3_000),  # 1500 + 2000 held: 2500 left, denied with a wait
        ("adjust", "b", 500, True),
        ("reserve", "c", 3_000),
        ("reserve", "d", 10),  # 2 streams open
        ("reserve", "e", 7_000),  # bigger than the whole budget: waiting cannot help
        ("undo", "c"),
        ("adjust", "a", 1_400, True),
        ("reserve", "f", 100),
        ("reserve", "g", 100),
    ]
    try:
        for op in ops:
            outcomes = []
            for store in (local, shared):
                try:
                    if op[0] == "reserve":
                        await store.reserve(bs, op[2], op[1], 30)
                    elif op[0] == "adjust":
                        await store.adjust(bs, op[1], op[2], op[3])
                    else:
                        await store.undo(bs, op[1], 30)
                    outcomes.append("ok")
                except Denied as d:
                    outcomes.append((sorted((v.budget.scope, v.kind) for v in d.violations), d.retry_after_s))
            a, b = outcomes
            if a == "ok" or b == "ok":
                assert a == b, (op, outcomes)
            else:
                assert a[0] == b[0], (op, outcomes)
                assert (a[1] is None) == (b[1] is None), (op, outcomes)
                if a[1] is not None:
                    assert abs(a[1] - b[1]) < 0.1, (op, outcomes)
            for x, y in zip(levels(await local.remaining(bs)), levels(await shared.remaining(bs))):
                assert abs(x[0] - y[0]) < 0.01 and abs(x[1] - y[1]) < 5 and x[2] == y[2], (op, x, y)
        # Where it ends: 5 requests - a, b, c, f, g + c's undone (d was refused: 2 streams open), and
        # 6000 - 1400 (a) - 500 (b) - 100 (f) - 100 (g) tokens, plus what refilled meanwhile.
        (req, tok, conc), _ = levels(await shared.remaining(bs))
        assert 1 <= req < 1.1 and 3_900 <= tok < 4_000 and conc == 2
    finally:
        await shared.close()


async def test_local_store_forgets_idle_subjects():
    now = [1_000.0]
    store = LocalStore(clock=lambda: now[0])
    lim = QuotaLimits(requests_per_minute=10, tokens_per_minute=100, concurrent_streams=1)
    for i in range(5_000):  # one JWT subject per user
        bs = [Budget("tenant", f"user{i}", lim)]
        await store.reserve(bs, 10, f"l{i}", 300)
        await store.adjust(bs, f"l{i}", 5, True)
    assert store.entries() >= 10_000
    now[0] += 30
    held = [Budget("tenant", "streaming", lim)]
    await store.reserve(held, 60, "open-stream", 300)  # still open at the sweep
    now[0] += 31
    await store.reserve([Budget("tenant", "new", lim)], 1, "n", 300)  # a sweep runs
    # Left: the new subject's 2 buckets, lease set and record; the open stream's tokens bucket (not
    # full yet), lease set and record (its requests bucket is full again: gone).
    assert store.entries() == 7
    (r,) = await store.remaining(held)
    assert r.concurrent_in_use == 1 and 90 < r.tokens_available < 92  # 40 + 31 s x 100/60, not reset
    with pytest.raises(Denied):
        await store.reserve(held, 1, "second", 300)


def test_quota_limits_fit_get_quota_uint32():
    top = 2**32 - 1
    cfg = config.parse(
        {
            "gateway": {
                "quota": {
                    "default_key_limits": {"tokens_per_minute": top},
                    "default_tenant_limits": {"requests_per_minute": 7},
                }
            }
        }
    )
    assert cfg.gateway.quota.default_key_limits.tokens_per_minute == top
    assert cfg.gateway.quota.default_tenant_limits.requests_per_minute == 7
    assert cfg.gateway.quota.lease_ttl_s == 300
    for field in ("requests_per_minute", "tokens_per_minute", "concurrent_streams"):
        with pytest.raises(config.ConfigError, match=f"gateway.quota.default_key_limits.{field}"):
            config.parse({"gateway": {"quota": {"default_key_limits": {field: top + 1}}}})


# --- through gateway processes ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_read_only_replica_gives_the_failure_mode_to_clients(tmp_path, start_redis, mode):
    """After a failover the gateways may still talk to the old primary, now a read-only replica:
    clients get the failure mode's answer (admitted on local limits, or UNAVAILABLE), never UNKNOWN."""
    primary = start_redis("p")
    replica = start_redis("r", "--replicaof", "127.0.0.1", str(primary.port))
    keys = tmp_path / "keys.yaml"
    key = igw_keys("issue", "--file", str(keys), "--tenant", "t", "--rpm", "2")
    cfg = make_config(
        "synthetic",
        worker={"synthetic": {"tokens_per_s": 200}},
        gateway={
            "auth": {"mode": "api_key", "key_file": str(keys)},
            "quota": {"store": "redis", "redis_url": replica.url, "redis_failure_mode": mode},
        },
    )
    s = build_stack(tmp_path, cfg)
    try:
        s.start_worker()
        s.start_gateway()
        stub = s.gateway_stub("gateway")
        if mode == "open":
            for _ in range(2):
                assert execute(stub, key, max_tokens=1)[-1].done.usage.completion_tokens == 1
            with pytest.raises(grpc.RpcError) as info:
                execute(stub, key, max_tokens=1)  # this gateway's own bucket of 2 per minute
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "fail open" in s.log("gateway").read_text()
        else:
            with pytest.raises(grpc.RpcError) as info:
                execute(stub, key, max_tokens=1)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "quota store" in info.value.details()
            assert "READONLY" in s.log("gateway").read_text()
        # GetQuota reads only, which a replica answers.
        assert quota(stub, key).budgets[0].requests_per_minute == 2
        assert s.procs["gateway"].poll() is None
    finally:
        s.stop()


@pytest.fixture(scope="module")
def short_leases(tmp_path_factory, redis_server):
    """Two gateways sharing Redis with 1.5 s leases; a synthetic worker at 20 tokens/s."""
    tmp = tmp_path_factory.mktemp("leases")
    keys = tmp / "keys.yaml"
    cfg = make_config(
        "synthetic",
        worker={"synthetic": {"tokens_per_s": 20}},
        gateway={
            "auth": {"mode": "api_key", "key_file": str(keys), "reload_interval_s": 0.2},
            "quota": {"store": "redis", "redis_url": redis_server.url, "lease_ttl_s": 1.5},
        },
    )
    igw_keys("tenant", "--file", str(keys), "unused")
    s = build_stack(tmp, cfg)
    try:
        s.start_worker()
        addrs = [cfg["gateway"]["listen"], f"127.0.0.1:{free_port()}"]
        for i, addr in enumerate(addrs):
            s.start_gateway(name=f"gateway{i}", listen=addr)
        yield s, keys, [gpb_stub(a) for a in addrs]
    finally:
        s.stop()


def test_long_stream_keeps_its_lease_and_a_dead_gateways_lease_expires(short_leases):
    s, keys, stubs = short_leases
    ttl = 1.5
    key = new_key(keys, "t-lease", "--concurrent", "1")
    md = [("authorization", f"Bearer {key}")]
    req = gpb.ExecuteRequest(task="count please", sampling=gpb.SamplingParams(max_tokens=100))  # 5 s
    stream = iter(stubs[0].Execute(req, metadata=md, timeout=60))
    assert next(stream).WhichOneof("event") == "started"
    t0 = time.monotonic()
    refusals = 0
    while time.monotonic() - t0 < 3.5:  # over twice the lease TTL
        with pytest.raises(grpc.RpcError) as info:
            execute(stubs[1], key, max_tokens=1)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        assert "concurrent streams limit of 1" in info.value.details()
        refusals += 1
        time.sleep(0.3)
    assert quota(stubs[1], key).budgets[0].concurrent_streams_in_use == 1
    assert list(stream)[-1].done.usage.completion_tokens == 100
    assert time.monotonic() - t0 > 2 * ttl and refusals >= 5

    # A gateway killed mid-stream cannot release its lease: it expires within the TTL.
    call = stubs[0].Execute(req, metadata=md, timeout=60)
    assert next(iter(call)).WhichOneof("event") == "started"
    time.sleep(0.6)  # at least one renewal has happened
    assert quota(stubs[1], key).budgets[0].concurrent_streams_in_use == 1
    s.procs["gateway0"].kill()
    killed = time.monotonic()
    while quota(stubs[1], key).budgets[0].concurrent_streams_in_use:
        assert time.monotonic() - killed < ttl + 0.5, "the dead gateway's lease outlived its TTL"
        time.sleep(0.05)
    assert execute(stubs[1], key, max_tokens=1)[-1].done.usage.completion_tokens == 1
