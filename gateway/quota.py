"""Quotas: requests per minute, tokens per minute and concurrent streams.

Each limit is a token bucket whose capacity is the per-minute figure and
which refills continuously at figure/60 per second, so a client can burst up
to its minute's budget and then proceeds at the steady rate. Concurrent
streams are leases that expire after ``gateway.quota.lease_ttl_s`` should a
gateway die without releasing them.

Exactness: at admission, one call reserves *everything* a request may use
on every budget it is subject to (key and tenant): one request, and
``prompt_tokens + max_tokens`` tokens. Either all budgets have room and all
are charged, or nothing is charged and the caller learns how long to wait.
The prompt is not tokenized yet at admission, so the reservation uses an
upper bound (UTF-8 bytes + template overhead; a token is at least one byte)
and is trimmed to the real prompt when the worker accepts the request. At the
end the unused part of ``max_tokens`` is refunded. A stream can therefore
never overshoot its budget, and concurrent requests can never all pass on
the same remaining budget.

Two stores, one interface: ``LocalStore`` (in-process, the embedded
default; atomic because it runs on one event loop without awaiting) and
``RedisStore`` (a Lua script per operation, atomic on the Redis server, so
several gateway replicas share one budget exactly; time comes from Redis's
own clock so replica clocks do not matter).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

from gateway.config import QuotaConfig, QuotaLimits

log = logging.getLogger("gateway.quota")

KINDS = ("requests", "tokens", "concurrent")


@dataclass(frozen=True)
class Budget:
    """One subject's limits: ``scope`` is "key" or "tenant"."""

    scope: str
    name: str
    limits: QuotaLimits

    @property
    def subject(self) -> str:
        return f"{self.scope}:{self.name}"


@dataclass(frozen=True)
class Violation:
    budget: Budget
    kind: str  # one of KINDS
    description: str


class Denied(Exception):
    """No room: ``retry_after_s`` is None when waiting cannot help."""

    def __init__(self, retry_after_s: float | None, violations: list[Violation]):
        super().__init__("; ".join(v.description for v in violations))
        self.retry_after_s = retry_after_s
        self.violations = violations


class StoreUnavailable(Exception):
    """The shared store cannot be reached."""


@dataclass
class Reservation:
    budgets: list[Budget]
    tokens: int
    lease_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    store: "Store | None" = None


@dataclass
class Remaining:
    budget: Budget
    requests_available: float
    tokens_available: float
    concurrent_in_use: int


def _violation(b: Budget, kind: str, level: float, cost: float) -> tuple[Violation, float | None]:
    lim = {"requests": b.limits.requests_per_minute, "tokens": b.limits.tokens_per_minute}[kind]
    if cost > lim:
        return Violation(b, kind, f"{b.scope} {b.name}: this request needs {cost:.0f} {kind} but the whole "
                                  f"budget is {lim} per minute; lower max_tokens or shorten the prompt"), None
    wait = (cost - level) / (lim / 60.0)
    return Violation(b, kind, f"{b.scope} {b.name}: {kind} per minute limit of {lim} reached"), wait


class Store(abc.ABC):
    @abc.abstractmethod
    async def reserve(self, budgets: list[Budget], tokens: int, lease_id: str, lease_ttl_s: float) -> None:
        """Charge one request, ``tokens`` tokens and a stream lease on every budget, or raise Denied."""

    @abc.abstractmethod
    async def refund(self, budgets: list[Budget], tokens: int, lease_id: str | None) -> None:
        """Give ``tokens`` back and, with a lease id, end that lease."""

    @abc.abstractmethod
    async def remaining(self, budgets: list[Budget]) -> list[Remaining]:
        """What each budget has left now."""

    async def close(self) -> None:
        pass


class LocalStore(Store):
    """In-process buckets: one gateway's own view."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # (subject, kind) -> (level, at)
        self._leases: dict[str, dict[str, float]] = {}  # subject -> lease id -> expiry

    def _level(self, b: Budget, kind: str, now: float) -> float:
        lim = b.limits.requests_per_minute if kind == "requests" else b.limits.tokens_per_minute
        level, at = self._buckets.get((b.subject, kind), (float(lim), now))
        return min(float(lim), level + (now - at) * lim / 60.0)

    def _leases_of(self, b: Budget, now: float) -> dict[str, float]:
        leases = self._leases.setdefault(b.subject, {})
        for lid in [l for l, exp in leases.items() if exp <= now]:
            del leases[lid]
        return leases

    async def reserve(self, budgets, tokens, lease_id, lease_ttl_s):
        now = time.monotonic()
        violations, waits = [], []
        for b in budgets:
            for kind, cost, lim in (("requests", 1, b.limits.requests_per_minute),
                                    ("tokens", tokens, b.limits.tokens_per_minute)):
                if lim and self._level(b, kind, now) < cost:
                    v, wait = _violation(b, kind, self._level(b, kind, now), cost)
                    violations.append(v)
                    waits.append(wait)
            if b.limits.concurrent_streams and len(self._leases_of(b, now)) >= b.limits.concurrent_streams:
                violations.append(Violation(b, "concurrent", f"{b.scope} {b.name}: concurrent streams limit of "
                                                             f"{b.limits.concurrent_streams} reached"))
                waits.append(1.0)
        if violations:
            raise Denied(None if None in waits else max(waits), violations)
        for b in budgets:
            for kind, cost, lim in (("requests", 1, b.limits.requests_per_minute),
                                    ("tokens", tokens, b.limits.tokens_per_minute)):
                if lim:
                    self._buckets[(b.subject, kind)] = (self._level(b, kind, now) - cost, now)
            if b.limits.concurrent_streams:
                self._leases_of(b, now)[lease_id] = now + lease_ttl_s

    async def refund(self, budgets, tokens, lease_id):
        now = time.monotonic()
        for b in budgets:
            if b.limits.tokens_per_minute and tokens:
                level = min(float(b.limits.tokens_per_minute), self._level(b, "tokens", now) + tokens)
                self._buckets[(b.subject, "tokens")] = (level, now)
            if lease_id:
                self._leases_of(b, now).pop(lease_id, None)

    async def remaining(self, budgets):
        now = time.monotonic()
        return [Remaining(b, self._level(b, "requests", now), self._level(b, "tokens", now),
                          len(self._leases_of(b, now))) for b in budgets]


# KEYS: 3 per budget (requests bucket, tokens bucket, lease set).
# ARGV: n, tokens, lease_id, lease_ttl_ms, then 3 per budget (rpm, tpm, concurrent).
# Returns {1} when charged, else {0, wait_ms (-1 = never), kind index, budget index, level*1000, ...}.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n, cost, lease, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local function level(key, lim)
  local v = redis.call('HMGET', key, 'l', 't')
  if not v[1] then return lim end
  return math.min(lim, tonumber(v[1]) + (now - tonumber(v[2])) * lim / 60000)
end
local out, worst = {0, 0}, 0
local levels = {}
for i = 1, n do
  local rpm, tpm, conc = tonumber(ARGV[4 + 3*i - 2]), tonumber(ARGV[4 + 3*i - 1]), tonumber(ARGV[4 + 3*i])
  local checks = {{KEYS[3*i - 2], rpm, 1, 1}, {KEYS[3*i - 1], tpm, cost, 2}}
  for _, c in ipairs(checks) do
    if c[2] > 0 then
      local l = level(c[1], c[2])
      levels[c[1]] = l
      if l < c[3] then
        local wait = -1
        if c[3] <= c[2] then wait = math.ceil((c[3] - l) * 60000 / c[2]) end
        if wait < 0 or worst < 0 then worst = -1 elseif wait > worst then worst = wait end
        table.insert(out, c[4]); table.insert(out, i); table.insert(out, math.floor(l * 1000))
      end
    end
  end
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[3*i], '-inf', now)
    if redis.call('ZCARD', KEYS[3*i]) >= conc then
      if worst >= 0 and worst < 1000 then worst = 1000 end
      table.insert(out, 3); table.insert(out, i); table.insert(out, 0)
    end
  end
end
if #out > 2 then out[2] = worst; return out end
for i = 1, n do
  local rpm, tpm, conc = tonumber(ARGV[4 + 3*i - 2]), tonumber(ARGV[4 + 3*i - 1]), tonumber(ARGV[4 + 3*i])
  local checks = {{KEYS[3*i - 2], rpm, 1}, {KEYS[3*i - 1], tpm, cost}}
  for _, c in ipairs(checks) do
    if c[2] > 0 then
      redis.call('HSET', c[1], 'l', tostring(levels[c[1]] - c[3]), 't', now)
      redis.call('PEXPIRE', c[1], 120000)
    end
  end
  if conc > 0 then
    redis.call('ZADD', KEYS[3*i], now + ttl, lease)
    redis.call('PEXPIRE', KEYS[3*i], ttl + 1000)
  end
end
return {1}
"""

# KEYS: 2 per budget (tokens bucket, lease set). ARGV: n, tokens, lease_id ("" = none), then tpm per budget.
_REFUND = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n, tokens, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
for i = 1, n do
  local tpm = tonumber(ARGV[3 + i])
  if tpm > 0 and tokens > 0 then
    local v = redis.call('HMGET', KEYS[2*i - 1], 'l', 't')
    local l = tpm
    if v[1] then l = math.min(tpm, tonumber(v[1]) + (now - tonumber(v[2])) * tpm / 60000) end
    redis.call('HSET', KEYS[2*i - 1], 'l', tostring(math.min(tpm, l + tokens)), 't', now)
    redis.call('PEXPIRE', KEYS[2*i - 1], 120000)
  end
  if lease ~= '' then redis.call('ZREM', KEYS[2*i], lease) end
end
return 1
"""

# KEYS: 3 per budget. ARGV: n, then (rpm, tpm) per budget. Returns level*1000 pairs and lease counts.
_REMAINING = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, tonumber(ARGV[1]) do
  for j = 1, 2 do
    local lim = tonumber(ARGV[1 + 2*i - 2 + j])
    local v = redis.call('HMGET', KEYS[3*i - 3 + j], 'l', 't')
    local l = lim
    if v[1] then l = math.min(lim, tonumber(v[1]) + (now - tonumber(v[2])) * lim / 60000) end
    table.insert(out, math.floor(l * 1000))
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[3*i], '-inf', now)
  table.insert(out, redis.call('ZCARD', KEYS[3*i]))
end
return out
"""


class RedisStore(Store):
    def __init__(self, url: str, prefix: str, timeout_s: float):
        import redis.asyncio as aioredis

        self._redis = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._prefix = prefix
        self._reserve = self._redis.register_script(_RESERVE)
        self._refund = self._redis.register_script(_REFUND)
        self._remaining = self._redis.register_script(_REMAINING)

    def _keys(self, b: Budget) -> list[str]:
        # {subject} is a Redis Cluster hash tag: one subject's keys live on one shard.
        base = f"{self._prefix}{{{b.subject}}}"
        return [f"{base}:req", f"{base}:tok", f"{base}:leases"]

    async def _call(self, script, keys, args):
        import redis.exceptions as rexc

        try:
            return await script(keys=keys, args=args)
        except (rexc.ConnectionError, rexc.TimeoutError, OSError) as err:
            raise StoreUnavailable(f"Redis unreachable: {type(err).__name__}") from None

    async def reserve(self, budgets, tokens, lease_id, lease_ttl_s):
        keys, args = [], [len(budgets), tokens, lease_id, int(lease_ttl_s * 1000)]
        for b in budgets:
            keys += self._keys(b)
            args += [b.limits.requests_per_minute, b.limits.tokens_per_minute, b.limits.concurrent_streams]
        out = await self._call(self._reserve, keys, args)
        if int(out[0]) == 1:
            return
        wait_ms = int(out[1])
        violations = []
        for j in range(2, len(out), 3):
            kind, b = KINDS[int(out[j]) - 1], budgets[int(out[j + 1]) - 1]
            if kind == "concurrent":
                violations.append(Violation(b, kind, f"{b.scope} {b.name}: concurrent streams limit of "
                                                     f"{b.limits.concurrent_streams} reached"))
            else:
                violations.append(_violation(b, kind, int(out[j + 2]) / 1000, 1 if kind == "requests" else tokens)[0])
        raise Denied(None if wait_ms < 0 else wait_ms / 1000, violations)

    async def refund(self, budgets, tokens, lease_id):
        keys, args = [], [len(budgets), tokens, lease_id or ""]
        for b in budgets:
            keys += self._keys(b)[1:]
            args.append(b.limits.tokens_per_minute)
        await self._call(self._refund, keys, args)

    async def remaining(self, budgets):
        keys, args = [], [len(budgets)]
        for b in budgets:
            keys += self._keys(b)
            args += [b.limits.requests_per_minute, b.limits.tokens_per_minute]
        out = await self._call(self._remaining, keys, args)
        return [Remaining(b, int(out[3 * i]) / 1000, int(out[3 * i + 1]) / 1000, int(out[3 * i + 2]))
                for i, b in enumerate(budgets)]

    async def close(self):
        await self._redis.aclose()


class Quotas:
    """The admission side: picks the store, applies the Redis failure policy, counts."""

    def __init__(self, cfg: QuotaConfig, on_store_failure=lambda: None):
        self.cfg = cfg
        self._on_store_failure = on_store_failure
        self.local = LocalStore()
        self.shared: Store | None = None
        if cfg.store == "redis":
            self.shared = RedisStore(cfg.redis_url, cfg.redis_key_prefix, cfg.redis_timeout_ms / 1000)
        self._tasks: set[asyncio.Task] = set()

    async def _on(self, op: str, fn):
        if self.shared is None:
            return await fn(self.local), self.local
        try:
            return await fn(self.shared), self.shared
        except StoreUnavailable as err:
            self._on_store_failure()
            if self.cfg.redis_failure_mode == "closed":
                log.error("quota store unreachable on %s; refusing (fail closed): %s", op, err)
                raise
            log.warning("quota store unreachable on %s; using this gateway's local limits (fail open): %s", op, err)
            return await fn(self.local), self.local

    async def reserve(self, budgets: list[Budget], tokens: int) -> Reservation | None:
        budgets = [b for b in budgets if b.limits.requests_per_minute or b.limits.tokens_per_minute
                   or b.limits.concurrent_streams]
        if not budgets:
            return None
        r = Reservation(budgets=budgets, tokens=tokens)
        _, r.store = await self._on("reserve", lambda s: s.reserve(budgets, tokens, r.lease_id, self.cfg.lease_ttl_s))
        return r

    def trim(self, r: Reservation | None, tokens_now: int) -> None:
        """Lower the reservation to ``tokens_now`` (the real prompt is known). The refund is written in
        the background: the stream does not wait for the store before its first token."""
        if r is None or tokens_now >= r.tokens:
            return
        give_back, r.tokens = r.tokens - tokens_now, tokens_now
        self._background(self._settle_on(r, give_back, None))

    def settle(self, r: Reservation | None, used_tokens: int) -> None:
        """Refund what was reserved but not used and end the lease (in the background)."""
        if r is not None:
            self._background(self._settle_on(r, max(0, r.tokens - used_tokens), r.lease_id))

    def _background(self, coro) -> None:
        # Refunds only add back, so their order does not matter; settle() computes from the
        # already-trimmed r.tokens.
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle_on(self, r: Reservation, tokens: int, lease_id: str | None) -> None:
        try:
            await r.store.refund(r.budgets, tokens, lease_id)
        except StoreUnavailable as err:
            self._on_store_failure()
            log.warning("quota refund of %d tokens lost, store unreachable: %s", tokens, err)

    async def remaining(self, budgets: list[Budget]) -> list[Remaining]:
        out, _ = await self._on("remaining", lambda s: s.remaining(budgets))
        return out

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.shared:
            await self.shared.close()


def prompt_token_bound(messages) -> int:
    """An upper bound on the prompt's tokens before it is tokenized: every token
    is at least one byte of text (byte-level BPE or byte fallback), plus the
    chat template's own tokens."""
    return sum(len(m.content.encode()) + 8 for m in messages) + 16
