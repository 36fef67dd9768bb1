"""What the quota stores and the facade share: budgets, outcomes and the store interface."""

from __future__ import annotations

import abc
import uuid
from dataclasses import dataclass, field

from igw_common.config import QuotaLimits

KINDS = ("requests", "tokens", "concurrent")


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

    def __post_init__(self):
        if not self.tenant:
            if self.scope != "tenant":
                raise ValueError(f"a {self.scope} budget needs its tenant")
            object.__setattr__(self, "tenant", self.name)

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


@dataclass
class Remaining:
    budget: Budget
    requests_available: float
    tokens_available: float
    concurrent_in_use: int


def violation(b: Budget, kind: str, level: float, cost: float) -> tuple[Violation, float | None]:
    """The violation of a per-minute bucket at ``level`` by a request costing ``cost``, and the wait
    until it has room (None: never, the request is bigger than the whole budget)."""
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
    async def reserve(self, budgets: list[Budget], tokens: int, lease_id: str, lease_ttl_s: float) -> None:
        """Charge one request, ``tokens`` tokens and a stream lease on every budget, or raise Denied.
        Charging twice under one lease id charges once."""

    @abc.abstractmethod
    async def adjust(self, budgets: list[Budget], lease_id: str, hold_tokens: int, end: bool) -> None:
        """Lower what the reservation holds to ``hold_tokens`` and refund the difference; with ``end``,
        end the reservation and its lease."""

    @abc.abstractmethod
    async def undo(self, budgets: list[Budget], lease_id: str, lease_ttl_s: float) -> None:
        """Refund everything the reservation charged (its request too) and end its lease; a reserve
        under this lease id that arrives later charges nothing."""

    @abc.abstractmethod
    async def renew(self, reservations: list[Reservation], lease_ttl_s: float) -> list[bool]:
        """Give each open reservation (and its lease) a fresh TTL; False for one the store no longer
        holds (settled, undone or expired), which is not brought back."""

    @abc.abstractmethod
    async def remaining(self, budgets: list[Budget]) -> list[Remaining]:
        """What each budget has left now."""

    async def close(self) -> None:
        pass
