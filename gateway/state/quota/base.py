"""What the quota stores and the facade share: budgets, outcomes and the store interface."""

from __future__ import annotations

import abc
import time
import uuid
from dataclasses import dataclass, field

from gateway.state.quota.pricing import Window, format_micros, to_micros, window_at
from igw_common.config import QuotaLimits

# The store scripts number kinds from 1 in this order.
KINDS = ("requests", "tokens", "concurrent", "spend_day", "spend_month")
SPEND_KINDS = ("spend_day", "spend_month")


@dataclass(frozen=True)
class Budget:
    """One subject's limits: ``scope`` is "key" or "tenant".

    ``tenant`` is the tenant the subject belongs to (a key's tenant; a tenant budget's own name when left
    empty). All budgets of one reservation belong to one tenant, and the Redis store keeps all of a
    tenant's keys in one hash slot, so one script may touch them all, on Redis Cluster too.
    """

    scope: str
    name: str
    limits: QuotaLimits
    tenant: str = ""
    currency: str = "USD"  # of the spend limits, for messages

    def __post_init__(self):
        if not self.tenant:
            if self.scope != "tenant":
                raise ValueError(f"a {self.scope} budget needs its tenant")
            object.__setattr__(self, "tenant", self.name)

    @property
    def subject(self) -> str:
        return f"{self.scope}:{self.name}"

    @property
    def day_limit(self) -> int:
        """Spend budget per UTC day, micro-units (0 = none)."""
        return to_micros(self.limits.spend_per_day)

    @property
    def month_limit(self) -> int:
        return to_micros(self.limits.spend_per_month)

    def limited(self) -> bool:
        lim = self.limits
        return bool(
            lim.requests_per_minute
            or lim.tokens_per_minute
            or lim.concurrent_streams
            or lim.spend_per_day
            or lim.spend_per_month
        )


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
    """The shared store did not answer, or refused the call (read-only replica, out of memory, ...).

    ``maybe_applied``: the call may have run anyway (it timed out after it was sent, or failed midway),
    so a reserve must be undone."""

    def __init__(self, message: str, maybe_applied: bool = True):
        super().__init__(message)
        self.maybe_applied = maybe_applied


@dataclass
class Reservation:
    budgets: list[Budget]
    tokens: int  # tokens held now (lowered by trim)
    lease_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    store: "Store | None" = None
    expires_at: float = 0.0  # event-loop time at which the store forgets it unless it is renewed
    cost: int = 0  # spend held now, micro-units (lowered by trim, settled to the real cost)
    # The day and month it was charged to: refunds go back there, even after midnight.
    window: Window = field(default_factory=lambda: window_at(time.time()))


@dataclass
class Remaining:
    budget: Budget
    requests_available: float
    tokens_available: float
    concurrent_in_use: int
    spent_today: int = 0  # micro-units, reservations of running requests included (tracked where a budget is set)
    spent_this_month: int = 0


def violation(
    b: Budget, kind: str, level: float, cost: float, window: Window | None = None
) -> tuple[Violation, float | None]:
    """The violation of a per-minute bucket at ``level`` by a request costing ``cost``, and the wait
    until it has room (None: never, the request is bigger than the whole budget). For a spend budget,
    ``level`` is what was spent in the window and ``cost`` what the request reserves (micro-units); it
    has room again when the window ends."""
    if kind in SPEND_KINDS:
        daily = kind == "spend_day"
        lim, what = (b.day_limit, "daily") if daily else (b.month_limit, "monthly")
        window = window or window_at(time.time())
        money = lambda v: format_micros(int(v), b.currency)  # noqa: E731
        if cost > lim:
            return Violation(
                b,
                kind,
                f"{b.scope} {b.name}: this request may cost up to {money(cost)} but the whole {what} spend "
                f"budget is {money(lim)}; lower max_tokens or shorten the prompt",
            ), None
        end = window.day_end if daily else window.month_end
        return Violation(
            b,
            kind,
            f"{b.scope} {b.name}: {what} spend budget of {money(lim)} reached ({money(level)} spent or reserved "
            f"{'today' if daily else 'this month'} (UTC); this request may cost up to {money(cost)})",
        ), max(1.0, end - time.time())
    if kind == "concurrent":
        return Violation(
            b, kind, f"{b.scope} {b.name}: concurrent streams limit of {b.limits.concurrent_streams} reached"
        ), 1.0
    lim = {"requests": b.limits.requests_per_minute, "tokens": b.limits.tokens_per_minute}[kind]
    if cost > lim:
        return Violation(
            b,
            kind,
            f"{b.scope} {b.name}: this request needs {cost:.0f} {kind} but the whole "
            f"budget is {lim} per minute; lower max_tokens or shorten the prompt",
        ), None
    wait = (cost - level) / (lim / 60.0)
    return Violation(b, kind, f"{b.scope} {b.name}: {kind} per minute limit of {lim} reached"), wait


class Store(abc.ABC):
    """Every operation but reserve is idempotent: the store records what each reservation holds, so a
    call retried after a timeout (it may have run) never refunds twice."""

    @abc.abstractmethod
    async def reserve(
        self,
        budgets: list[Budget],
        tokens: int,
        lease_id: str,
        lease_ttl_s: float,
        cost: int = 0,
        window: Window | None = None,
    ) -> None:
        """Charge one request, ``tokens`` tokens, ``cost`` micro-units of spend (in ``window``: the
        current one by default) and a stream lease on every budget, or raise Denied. Charging twice
        under one lease id charges once."""

    @abc.abstractmethod
    async def adjust(
        self,
        budgets: list[Budget],
        lease_id: str,
        hold_tokens: int,
        end: bool,
        hold_cost: int | None = None,
        window: Window | None = None,
    ) -> None:
        """Lower what the reservation holds to ``hold_tokens`` (and ``hold_cost``, None = unchanged) and
        refund the difference to the window it was charged in; with ``end``, end the reservation and its
        lease."""

    @abc.abstractmethod
    async def undo(
        self, budgets: list[Budget], lease_id: str, lease_ttl_s: float, window: Window | None = None
    ) -> None:
        """Refund everything the reservation charged (its request too) and end its lease; a reserve
        under this lease id that arrives later charges nothing."""

    @abc.abstractmethod
    async def renew(self, reservations: list[Reservation], lease_ttl_s: float) -> list[bool]:
        """Give each open reservation (and its lease) a fresh TTL; False for one the store no longer
        holds (settled, undone or expired), which is not brought back."""

    @abc.abstractmethod
    async def remaining(self, budgets: list[Budget], window: Window | None = None) -> list[Remaining]:
        """What each budget has left now (and has spent in the current window)."""

    async def close(self) -> None:
        pass
