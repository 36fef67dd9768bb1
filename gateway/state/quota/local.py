"""The in-process store: one gateway's own buckets (the embedded default, and Redis's fail-open fallback).

Atomic because every operation runs on one event loop without awaiting. Memory stays bounded with many
distinct subjects (one JWT ``sub`` per user): a bucket that has refilled to full is dropped (a missing
bucket reads as full), as are empty lease sets and expired reservations, in a sweep at most once per
``SWEEP_S`` amortized over the calls.
"""

from __future__ import annotations

import time

from gateway.state.quota.base import Budget, Denied, Remaining, Reservation, Store, violation
from gateway.state.quota.pricing import Window, window_at


def refill(level: float, at: float, now: float, per_minute: float) -> float:
    """A token bucket's level at ``now`` (seconds) that was ``level`` at ``at``: it refills continuously
    at ``per_minute``/60 per second up to ``per_minute``. The Redis store's lua/prelude.lua is this
    formula in Lua (time in ms); tests check the two agree."""
    return min(per_minute, level + (now - at) * per_minute / 60.0)


def _limit(b: Budget, kind: str) -> int:
    return b.limits.requests_per_minute if kind == "requests" else b.limits.tokens_per_minute


class LocalStore(Store):
    # Every bucket refills from empty to full within a minute, so a sweep per minute frees any bucket
    # untouched for a minute: memory is bounded by the subjects active in the last two minutes.
    SWEEP_S = 60.0

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float, float]] = {}  # (subject, kind) -> level, at, full at
        self._leases: dict[str, dict[str, float]] = {}  # subject -> lease id -> expiry
        self._held: dict[str, tuple[int, float]] = {}  # lease id -> (tokens held, expiry); -1 tokens: undone
        self._held_cost: dict[str, int] = {}  # lease id -> spend held (micro-units), beside _held
        # (subject, "d" | "m", day or month id) -> spent (micro-units), only where a spend budget is set.
        self._spend: dict[tuple[str, str, int], int] = {}
        self._next_sweep = clock() + self.SWEEP_S

    def entries(self) -> int:
        """How many buckets, lease sets and reservations are kept (memory, for tests)."""
        return len(self._buckets) + len(self._leases) + len(self._held)

    @staticmethod
    def _spend_keys(b: Budget, w: Window) -> tuple[tuple[tuple[str, str, int], int], ...]:
        """(key, limit) of each spend budget ``b`` sets."""
        out = []
        if b.day_limit:
            out.append(((b.subject, "d", w.day), b.day_limit))
        if b.month_limit:
            out.append(((b.subject, "m", w.month), b.month_limit))
        return tuple(out)

    def _level(self, b: Budget, kind: str, now: float) -> float:
        lim = float(_limit(b, kind))
        level, at, _ = self._buckets.get((b.subject, kind), (lim, now, now))
        return refill(level, at, now, lim)

    def _set(self, b: Budget, kind: str, level: float, now: float) -> None:
        lim = _limit(b, kind)
        if level >= lim:
            self._buckets.pop((b.subject, kind), None)  # full: a missing bucket reads as full
        else:
            self._buckets[(b.subject, kind)] = (level, now, now + (lim - level) * 60.0 / lim)

    def _leases_of(self, b: Budget, now: float) -> dict[str, float]:
        leases = self._leases.get(b.subject, {})
        for lid in [lid for lid, exp in leases.items() if exp <= now]:
            del leases[lid]
        return leases

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.SWEEP_S
        self._buckets = {k: v for k, v in self._buckets.items() if v[2] > now}
        self._leases = {
            s: live
            for s, leases in self._leases.items()
            if (live := {lid: exp for lid, exp in leases.items() if exp > now})
        }
        self._held = {lid: v for lid, v in self._held.items() if v[1] > now}
        self._held_cost = {lid: c for lid, c in self._held_cost.items() if lid in self._held}
        # Windows before the previous day/month take no more refunds (a reservation lives minutes).
        w = window_at(time.time())
        prev_month = w.month - 1 if w.month % 100 != 1 else w.month - 89  # 202501 -> 202412
        self._spend = {k: v for k, v in self._spend.items() if k[2] >= (w.day - 1 if k[1] == "d" else prev_month)}

    async def reserve(self, budgets, tokens, lease_id, lease_ttl_s, cost=0, window=None):
        now = self._clock()
        self._sweep(now)
        if lease_id in self._held:
            return  # charged already (or undone): never twice
        w = window or window_at(time.time())
        money = cost  # `cost` is reused below for each bucket's charge
        violations, waits = [], []
        for b in budgets:
            for key, limit in self._spend_keys(b, w):
                spent = self._spend.get(key, 0)
                if spent + money > limit:
                    v, wait = violation(b, "spend_day" if key[1] == "d" else "spend_month", spent, money, w)
                    violations.append(v)
                    waits.append(wait)
            for kind, cost in (("requests", 1), ("tokens", tokens)):
                if _limit(b, kind) and (level := self._level(b, kind, now)) < cost:
                    v, wait = violation(b, kind, level, cost)
                    violations.append(v)
                    waits.append(wait)
            if b.limits.concurrent_streams and len(self._leases_of(b, now)) >= b.limits.concurrent_streams:
                v, wait = violation(b, "concurrent", 0, 1)
                violations.append(v)
                waits.append(wait)
        if violations:
            raise Denied(None if None in waits else max(waits), violations)
        for b in budgets:
            for kind, cost in (("requests", 1), ("tokens", tokens)):
                if _limit(b, kind):
                    self._set(b, kind, self._level(b, kind, now) - cost, now)
            if b.limits.concurrent_streams:
                self._leases.setdefault(b.subject, {})[lease_id] = now + lease_ttl_s
            for key, _ in self._spend_keys(b, w):
                self._spend[key] = self._spend.get(key, 0) + money
        self._held[lease_id] = (tokens, now + lease_ttl_s)
        self._held_cost[lease_id] = money

    def _refund(self, budgets: list[Budget], kind: str, amount: float, now: float) -> None:
        for b in budgets:
            if _limit(b, kind) and amount > 0:
                self._set(b, kind, min(float(_limit(b, kind)), self._level(b, kind, now) + amount), now)

    def _end_lease(self, budgets: list[Budget], lease_id: str) -> None:
        for b in budgets:
            leases = self._leases.get(b.subject)
            if leases is not None:
                leases.pop(lease_id, None)
                if not leases:
                    del self._leases[b.subject]

    def _refund_spend(self, budgets: list[Budget], amount: int, w: Window) -> None:
        for b in budgets:
            for key, _ in self._spend_keys(b, w):
                if amount > 0 and key in self._spend:
                    self._spend[key] = max(0, self._spend[key] - amount)

    async def adjust(self, budgets, lease_id, hold_tokens, end, hold_cost=None, window=None):
        now = self._clock()
        held, expiry = self._held.get(lease_id, (-1, 0.0))
        if held >= 0 and expiry > now:
            give = max(0, held - hold_tokens)
            self._refund(budgets, "tokens", give, now)
            self._held[lease_id] = (held - give, expiry)
            held_cost = self._held_cost.get(lease_id, 0)
            if hold_cost is not None and held_cost > hold_cost:
                self._refund_spend(budgets, held_cost - hold_cost, window or window_at(time.time()))
                self._held_cost[lease_id] = hold_cost
        if end:
            self._end_lease(budgets, lease_id)
            if held >= 0:
                self._held.pop(lease_id, None)
                self._held_cost.pop(lease_id, None)

    async def undo(self, budgets, lease_id, lease_ttl_s, window=None):
        now = self._clock()
        held, expiry = self._held.get(lease_id, (-1, 0.0))
        if held >= 0 and expiry > now:
            self._refund(budgets, "requests", 1, now)
            self._refund(budgets, "tokens", held, now)
            self._refund_spend(budgets, self._held_cost.get(lease_id, 0), window or window_at(time.time()))
            self._end_lease(budgets, lease_id)
        self._held[lease_id] = (-1, now + lease_ttl_s)
        self._held_cost.pop(lease_id, None)

    async def renew(self, reservations: list[Reservation], lease_ttl_s):
        now = self._clock()
        alive = []
        for r in reservations:
            held, expiry = self._held.get(r.lease_id, (-1, 0.0))
            ok = held >= 0 and expiry > now
            if ok:
                self._held[r.lease_id] = (held, now + lease_ttl_s)
                for b in r.budgets:
                    leases = self._leases.get(b.subject, {})
                    if r.lease_id in leases:
                        leases[r.lease_id] = now + lease_ttl_s
            alive.append(ok)
        return alive

    async def remaining(self, budgets, window=None):
        now = self._clock()
        w = window or window_at(time.time())
        return [
            Remaining(
                b,
                self._level(b, "requests", now),
                self._level(b, "tokens", now),
                len(self._leases_of(b, now)),
                self._spend.get((b.subject, "d", w.day), 0),
                self._spend.get((b.subject, "m", w.month), 0),
            )
            for b in budgets
        ]
