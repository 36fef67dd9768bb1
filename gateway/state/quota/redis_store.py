"""The Redis store: one Lua script per operation, atomic on the Redis server, so any number of gateway
replicas share one budget exactly.

Keys (prefix ``gateway.quota.redis_key_prefix``; tenant and names percent-encoded)::

    <prefix>{t:<tenant>}:<scope>:<name>:req|tok|leases   a budget's buckets and stream leases
    <prefix>{t:<tenant>}:<scope>:<name>:sd:<day>          spend of one UTC day (micro-units; days since 1970)
    <prefix>{t:<tenant>}:<scope>:<name>:sm:<yyyymm>       spend of one UTC month
    <prefix>{t:<tenant>}:res:<lease id>                   what one reservation holds (or a tombstone)

Spend windows are named by the gateway's clock at reserve time and remembered with the reservation, so a
refund after midnight goes back to the day that was charged. Each window's key is checked and charged
atomically, so replicas whose clocks differ by a second near midnight can charge neighbouring windows for
that second, but no window ever holds more than its budget.

``{t:<tenant>}`` is a Redis Cluster hash tag: a key budget and its tenant's budget live in one hash
slot, so one script may touch both (no CROSSSLOT).

Every failure (no answer within ``redis_timeout_ms``, connection refused, READONLY from a replica after a
failover, OOM, CROSSSLOT, LOADING, a script error, ...) becomes ``StoreUnavailable``, which the facade
turns into the configured failure mode. The scripts share one prelude (Redis's clock and the bucket
refill) prepended at load time.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from urllib.parse import quote

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.state.quota.base import (
    KINDS,
    SPEND_KINDS,
    Budget,
    Denied,
    Remaining,
    Reservation,
    Store,
    StoreUnavailable,
    violation,
)
from gateway.state.quota.pricing import Window, window_at

# Redis refuses these before running the script (nothing was written): no undo needed.
_REFUSED_UNRUN = {
    "READONLY",
    "CROSSSLOT",
    "MOVED",
    "ASK",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "LOADING",
    "MASTERDOWN",
    "NOSCRIPT",
    "NOAUTH",
    "WRONGPASS",
    "NOPERM",
    "BUSY",
    "MISCONF",
    "NOREPLICAS",
}
_RENEW_BATCH = 256  # renewals per pipelined round trip


def load_script(name: str) -> str:
    """lua/<name>.lua with the shared prelude in front (package resources: works from a wheel too)."""
    lua = resources.files("gateway.state.quota").joinpath("lua")
    return lua.joinpath("prelude.lua").read_text() + "\n" + lua.joinpath(f"{name}.lua").read_text()


def _esc(s: str) -> str:
    # Injective, and no '{' or '}' can end the hash tag early.
    return quote(s, safe="")


class RedisStore(Store):
    SCRIPTS = ("reserve", "adjust", "undo", "renew", "remaining")

    def __init__(self, url: str, prefix: str, timeout_s: float):
        # One immediate retry on a broken connection (a pooled one left from before a Redis restart), none
        # after a timeout (the caller's time is up). Every script may safely run twice: a reserve finds its
        # own record and charges once.
        self._redis = aioredis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(rexc.ConnectionError,)),
        )
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._scripts = {name: self._redis.register_script(load_script(name)) for name in self.SCRIPTS}

    # --- keys -------------------------------------------------------------------------------------

    def _tag(self, budgets: list[Budget]) -> str:
        tenants = {b.tenant for b in budgets}
        if len(tenants) != 1:
            raise ValueError(f"one quota call must concern one tenant, got {len(tenants)}")
        return f"{self._prefix}{{t:{_esc(tenants.pop())}}}"

    def _keys(self, tag: str, b: Budget, w: Window | None = None) -> list[str]:
        """requests bucket, tokens bucket, lease set, spend of the window's day and month."""
        base = f"{tag}:{b.scope}:{_esc(b.name)}"
        w = w or window_at(time.time())
        return [f"{base}:req", f"{base}:tok", f"{base}:leases", f"{base}:sd:{w.day}", f"{base}:sm:{w.month}"]

    @staticmethod
    def _record(tag: str, lease_id: str) -> str:
        return f"{tag}:res:{lease_id}"

    # --- calls --------------------------------------------------------------------------------------

    async def _run(self, op: str, coro_fn):
        try:
            async with asyncio.timeout(self._timeout_s):
                return await coro_fn()
        except (rexc.ResponseError, rexc.BusyLoadingError, rexc.AuthenticationError) as err:
            # redis-py strips the error code (READONLY, OOM, ...) from the message into status_code.
            code = getattr(err, "status_code", None) or str(err).split(" ", 1)[0]
            raise StoreUnavailable(
                f"Redis refused {op}: {code} {str(err)[:160]}", maybe_applied=code not in _REFUSED_UNRUN
            ) from None
        except (rexc.RedisError, OSError, TimeoutError) as err:
            # Refused before the connection existed: the call never left. Otherwise it may have run.
            unsent = isinstance(err, rexc.ConnectionError) and "connecting to" in str(err)
            what = "timed out" if isinstance(err, (TimeoutError, rexc.TimeoutError)) else type(err).__name__
            raise StoreUnavailable(f"Redis unreachable on {op}: {what}", maybe_applied=not unsent) from None

    async def _call(self, op: str, keys: list[str], args: list):
        return await self._run(op, lambda: self._scripts[op](keys=keys, args=args))

    async def reserve(self, budgets, tokens, lease_id, lease_ttl_s, cost=0, window=None):
        tag = self._tag(budgets)
        w = window or window_at(time.time())
        keys = [self._record(tag, lease_id)]
        args = [len(budgets), tokens, lease_id, int(lease_ttl_s * 1000), int(cost), w.day_expire_at, w.month_expire_at]
        for b in budgets:
            keys += self._keys(tag, b, w)
            args += [
                b.limits.requests_per_minute,
                b.limits.tokens_per_minute,
                b.limits.concurrent_streams,
                b.day_limit,
                b.month_limit,
            ]
        out = await self._call("reserve", keys, args)
        if int(out[0]) == 1:
            return
        if int(out[0]) == 2:
            raise StoreUnavailable("Redis: this reservation was undone already", maybe_applied=False)
        wait_ms = int(out[1])  # of the buckets (requests, tokens, streams); -1: waiting cannot help
        violations, waits = [], []
        for j in range(2, len(out), 3):
            kind, b = KINDS[int(out[j]) - 1], budgets[int(out[j + 1]) - 1]
            if kind in SPEND_KINDS:
                v, wait = violation(b, kind, int(out[j + 2]), cost, w)
            else:
                v = violation(b, kind, int(out[j + 2]) / 1000, 1 if kind == "requests" else tokens)[0]
                wait = None if wait_ms < 0 else wait_ms / 1000
            violations.append(v)
            waits.append(wait)
        raise Denied(None if None in waits else max(waits), violations)

    async def adjust(self, budgets, lease_id, hold_tokens, end, hold_cost=None, window=None):
        tag = self._tag(budgets)
        w = window or window_at(time.time())
        hold_money = -1 if hold_cost is None else max(0, int(hold_cost))
        keys = [self._record(tag, lease_id)]
        args = [len(budgets), max(0, hold_tokens), lease_id, int(end), hold_money]
        for b in budgets:
            keys += self._keys(tag, b, w)[1:]
            args += [b.limits.tokens_per_minute, b.day_limit, b.month_limit]
        await self._call("adjust", keys, args)

    async def undo(self, budgets, lease_id, lease_ttl_s, window=None):
        tag = self._tag(budgets)
        w = window or window_at(time.time())
        keys, args = [self._record(tag, lease_id)], [len(budgets), lease_id, int(lease_ttl_s * 1000)]
        for b in budgets:
            keys += self._keys(tag, b, w)
            args += [b.limits.requests_per_minute, b.limits.tokens_per_minute, b.day_limit, b.month_limit]
        await self._call("undo", keys, args)

    async def renew(self, reservations: list[Reservation], lease_ttl_s):
        script, ttl_ms, alive = self._scripts["renew"], int(lease_ttl_s * 1000), []
        for i in range(0, len(reservations), _RENEW_BATCH):
            batch = reservations[i : i + _RENEW_BATCH]

            async def send(batch=batch):
                # One round trip per batch; every script touches one tenant's slot only.
                pipe = self._redis.pipeline(transaction=False)
                for r in batch:
                    tag = self._tag(r.budgets)
                    await script(
                        keys=[self._record(tag, r.lease_id)] + [self._keys(tag, b)[2] for b in r.budgets],
                        args=[r.lease_id, ttl_ms],
                        client=pipe,
                    )
                return await pipe.execute()

            alive += [int(x) == 1 for x in await self._run("renew", send)]
        return alive

    async def remaining(self, budgets, window=None):
        tag = self._tag(budgets)
        w = window or window_at(time.time())
        keys, args = [], [len(budgets)]
        for b in budgets:
            keys += self._keys(tag, b, w)
            args += [b.limits.requests_per_minute, b.limits.tokens_per_minute]
        out = await self._call("remaining", keys, args)
        return [
            Remaining(
                b,
                int(out[5 * i]) / 1000,
                int(out[5 * i + 1]) / 1000,
                int(out[5 * i + 2]),
                int(out[5 * i + 3]),
                int(out[5 * i + 4]),
            )
            for i, b in enumerate(budgets)
        ]

    async def close(self):
        await self._redis.aclose()
