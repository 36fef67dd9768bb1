"""The facade the service uses: picks the store, applies the Redis failure mode, and makes sure every
reservation is either settled or expires soon.

- A reserve runs as its own task: if the caller is cancelled meanwhile (client gone), the call still
  completes and whatever it charged is settled at once.
- A reserve whose outcome is unknown (timed out: it may still run in Redis) is undone in the background,
  retried until Redis answers; a late reserve then finds a tombstone and charges nothing.
- A trim or settle that fails is retried in the background with backoff (the store makes them
  idempotent) until it is written or its reservation has expired in the store anyway.
- One task renews the leases of all open reservations every ``lease_ttl_s``/3, so a stream longer than
  the TTL keeps its lease, and a dead gateway's leases expire within ``lease_ttl_s``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass

from gateway.request import message_bytes
from gateway.state.quota.base import Budget, Remaining, Reservation, Store, StoreUnavailable
from gateway.state.quota.local import LocalStore
from gateway.state.quota.redis_store import RedisStore
from igw_common.config import QuotaConfig

log = logging.getLogger("gateway.state.quota")


@dataclass
class _Repair:
    """A Redis write to retry: an undo, or a trim/settle (adjust to ``hold`` tokens, ``end`` the lease)."""

    r: Reservation
    undo: bool
    hold: int = 0
    end: bool = False
    hold_cost: int | None = None
    give_up_at: float = 0.0  # undo: when the reserve's lease has expired anyway; adjust: r.expires_at

    def deadline(self) -> float:
        return self.give_up_at if self.undo else self.r.expires_at


class Quotas:
    """The admission side: picks the store, applies the Redis failure policy, counts."""

    def __init__(self, cfg: QuotaConfig, on_store_failure=lambda: None):
        self.cfg = cfg
        self._on_store_failure = on_store_failure
        self.local = LocalStore()
        self.shared: RedisStore | None = None
        if cfg.store == "redis":
            self.shared = RedisStore(cfg.redis_url, cfg.redis_key_prefix, cfg.redis_timeout_ms / 1000)
        self._tasks: set[asyncio.Task] = set()
        self._open: dict[str, Reservation] = {}  # lease id -> open reservation, renewed
        self._renewer: asyncio.Task | None = None
        self._repairs: collections.deque[_Repair] = collections.deque()
        self._repairer: asyncio.Task | None = None
        self._gave_up = 0  # repairs dropped (expired or queue full) since the last log line
        self._closed = False

    # --- reserve ------------------------------------------------------------------------------------

    async def reserve(self, budgets: list[Budget], tokens: int, cost: int = 0) -> Reservation | None:
        """Reserve one request, ``tokens`` tokens and ``cost`` micro-units of spend on every budget."""
        budgets = [b for b in budgets if b.limited()]
        if not budgets:
            return None
        r = Reservation(budgets=budgets, tokens=tokens, cost=cost)
        # Its own task: a caller cancelled mid-call (the script may already have run) does not cut it
        # short, and what it charged is settled when it completes.
        task = self._background(self._reserve(r))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._settle_abandoned)
            raise

    def _settle_abandoned(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:  # Denied/StoreUnavailable: nothing charged
            return
        self.settle(task.result(), 0)

    async def _reserve(self, r: Reservation) -> Reservation:
        loop = asyncio.get_running_loop()
        ttl = self.cfg.lease_ttl_s
        if self.shared is not None:
            try:
                await self.shared.reserve(r.budgets, r.tokens, r.lease_id, ttl, r.cost, r.window)
                r.store = self.shared
            except StoreUnavailable as err:
                self._on_store_failure()
                if err.maybe_applied:
                    self._queue_repair(_Repair(r, undo=True, give_up_at=loop.time() + ttl))
                if self.cfg.redis_failure_mode == "closed":
                    log.error("quota store unavailable on reserve; refusing (fail closed): %s", err)
                    raise
                log.warning(
                    "quota store unavailable on reserve; using this gateway's local limits (fail open): %s", err
                )
        if r.store is None:
            await self.local.reserve(r.budgets, r.tokens, r.lease_id, ttl, r.cost, r.window)
            r.store = self.local
        r.expires_at = loop.time() + ttl
        self._open[r.lease_id] = r
        if self._renewer is None and not self._closed:
            self._renewer = loop.create_task(self._renew_loop())
        return r

    # --- trim, settle -------------------------------------------------------------------------------

    def trim(self, r: Reservation | None, tokens_now: int, cost_now: int | None = None) -> None:
        """Lower the reservation to ``tokens_now`` (and ``cost_now``): the real prompt is known. The refund
        is written in the background: the stream does not wait for the store before its first token."""
        if r is None:
            return
        cost_now = None if cost_now is None or cost_now >= r.cost else cost_now
        if tokens_now >= r.tokens and cost_now is None:
            return
        r.tokens = min(r.tokens, tokens_now)
        if cost_now is not None:
            r.cost = cost_now
        self._background(self._adjust(r, r.tokens, end=False, hold_cost=cost_now))

    def settle(self, r: Reservation | None, used_tokens: int, used_cost: int | None = None) -> None:
        """Refund what was reserved but not used (tokens, and spend down to ``used_cost``: None = keep
        what is held) and end the lease (in the background)."""
        if r is None:
            return
        self._open.pop(r.lease_id, None)
        hold_cost = None if used_cost is None else max(0, min(used_cost, r.cost))
        self._background(self._adjust(r, max(0, min(used_tokens, r.tokens)), end=True, hold_cost=hold_cost))

    async def _adjust(self, r: Reservation, hold: int, end: bool, hold_cost: int | None = None) -> None:
        # Both ask the store for a target (hold this much), not a delta: in any order, retried or not,
        # the store ends up holding the least asked for, refunded once.
        try:
            await r.store.adjust(r.budgets, r.lease_id, hold, end, hold_cost, r.window)
        except StoreUnavailable as err:
            self._on_store_failure()
            # Logged once per outage by the repair loop, not per request.
            log.debug(
                "quota %s to %s tokens not written, retrying in the background: %s",
                "settle" if end else "trim",
                hold,
                err,
            )
            self._queue_repair(_Repair(r, undo=False, hold=hold, end=end, hold_cost=hold_cost))

    def _background(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- repairs: undo, trim and settle retried until Redis answers -------------------------------

    def _queue_repair(self, item: _Repair) -> None:
        if len(self._repairs) >= self.cfg.redis_retry_queue:
            self._repairs.popleft()  # its lease expires within lease_ttl_s all the same
            self._gave_up += 1
        self._repairs.append(item)
        if self._repairer is None or self._repairer.done():
            self._repairer = asyncio.get_running_loop().create_task(self._repair_loop())

    async def _repair_once(self, item: _Repair) -> None:
        if item.undo:
            await self.shared.undo(item.r.budgets, item.r.lease_id, self.cfg.lease_ttl_s, item.r.window)
        else:
            await self.shared.adjust(
                item.r.budgets, item.r.lease_id, item.hold, item.end, item.hold_cost, item.r.window
            )

    async def _repair_loop(self) -> None:
        loop = asyncio.get_running_loop()
        first = self.cfg.redis_timeout_ms / 1000
        backoff, done = first, 0
        while self._repairs:
            item = self._repairs.popleft()
            if loop.time() >= item.deadline():
                self._gave_up += 1  # the store has forgotten the reservation by now: nothing left to fix
                continue
            try:
                await self._repair_once(item)
            except asyncio.CancelledError:
                self._repairs.appendleft(item)  # close() gives it one more try
                raise
            except StoreUnavailable:
                self._on_store_failure()
                self._repairs.append(item)  # to the back: one stubborn item does not block the rest
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.cfg.redis_retry_backoff_max_ms / 1000)
                continue
            except Exception:  # a bug: drop this one (its lease expires) but keep repairing the rest
                log.exception("quota repair failed")
                continue
            done += 1
            backoff = first
        if self._gave_up:
            log.warning(
                "%d quota refunds/undos given up (Redis unreachable until their leases expired, or "
                "more than gateway.quota.redis_retry_queue waiting); %d written late",
                self._gave_up,
                done,
            )
            self._gave_up = 0
        elif done:
            log.info("quota store back: %d delayed refunds/undos written", done)

    # --- lease renewal ------------------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        loop = asyncio.get_running_loop()
        ttl = self.cfg.lease_ttl_s
        while True:
            await asyncio.sleep(ttl / 3)
            by_store: dict[int, tuple[Store, list[Reservation]]] = {}
            for r in self._open.values():
                by_store.setdefault(id(r.store), (r.store, []))[1].append(r)
            for store, rs in by_store.values():
                t0 = loop.time()
                try:
                    alive = await store.renew(rs, ttl)
                except StoreUnavailable as err:
                    self._on_store_failure()
                    log.warning(
                        "quota lease renewal of %d reservations failed (retried in %.1f s): %s", len(rs), ttl / 3, err
                    )
                    continue
                except Exception:  # a bug here must not stop renewing every later lease
                    log.exception("quota lease renewal failed")
                    continue
                for r, ok in zip(rs, alive):
                    if ok:
                        r.expires_at = t0 + ttl
                    else:  # expired in the store (e.g. Redis unreachable for a whole TTL): not brought back
                        self._open.pop(r.lease_id, None)

    # --- reads, shutdown ----------------------------------------------------------------------------

    async def remaining(self, budgets: list[Budget]) -> list[Remaining]:
        if self.shared is not None:
            try:
                return await self.shared.remaining(budgets)
            except StoreUnavailable as err:
                self._on_store_failure()
                if self.cfg.redis_failure_mode == "closed":
                    log.error("quota store unavailable on remaining; refusing (fail closed): %s", err)
                    raise
                log.warning(
                    "quota store unavailable on remaining; using this gateway's local limits (fail open): %s", err
                )
        return await self.local.remaining(budgets)

    async def close(self) -> None:
        self._closed = True
        if self._renewer is not None:
            self._renewer.cancel()
        while self._tasks:  # a reserve completing now may start a settle
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._repairer is not None and not self._repairer.done():
            # One more chance each, bounded: what is still unwritten expires within lease_ttl_s.
            self._repairer.cancel()
            await asyncio.gather(self._repairer, return_exceptions=True)
        left = 0
        while self._repairs:
            item = self._repairs.popleft()
            try:
                await self._repair_once(item)
            except StoreUnavailable:
                left += 1 + len(self._repairs)
                break
        if left:
            log.warning(
                "quota: %d refunds/undos not written at shutdown; their leases expire within lease_ttl_s (%.0f s)",
                left,
                self.cfg.lease_ttl_s,
            )
        if self.shared:
            await self.shared.close()


def prompt_token_bound(messages, tools_bytes: int = 0) -> int:
    """An upper bound on the prompt's tokens before it is tokenized: every token
    is at least one byte of text (byte-level BPE or byte fallback), plus the
    chat template's own tokens (and, with tools, the bytes they add to it)."""
    return sum(message_bytes(m) + 8 for m in messages) + 16 + tools_bytes
