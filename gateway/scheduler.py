"""Admission queue: who waits, in what order, and when a request may go to a worker.

Requests wait here, in the gateway, where they can still be cancelled,
reordered or sent elsewhere, until a worker has room: the gateway never
puts more on a worker than its reported capacity (concurrent requests and
outstanding tokens), so vLLM's own queue stays short.

Order:
- Priority classes, strictly: every queued ``interactive`` request goes
  before any ``batch`` request. A key's ``priority_max`` caps the class it
  may ask for.
- Within a class, fairness between tenants by **deficit round robin**
  (Shreedhar & Varghese, 1995) with the request's reserved tokens
  (prompt bound + max_tokens) as its cost: each tenant with queued work gets
  a quantum of ``gateway.queue.drr_quantum_tokens`` per round and sends
  requests while its deficit covers them. A tenant that floods only lengthens
  its own queue; another tenant waits at most about one round (one quantum
  per backlogged tenant) behind it.

Bounded: at most ``gateway.queue.max_queued`` requests wait; beyond that a
new request is refused at once (RESOURCE_EXHAUSTED with a retry hint). A
request whose deadline passes or whose client cancels while queued is
removed at once and never reaches a worker.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

PRIORITIES = ("interactive", "batch")  # highest first


@dataclass(eq=False)
class Ticket:
    """One queued request; ``granted`` resolves to the worker it may use."""

    model: str
    tenant: str
    priority: str
    cost_tokens: int
    affinity: str = ""  # session id or prompt-prefix hash: prefer the worker that served it before
    exclude: frozenset = frozenset()  # workers that already failed this request
    pool: str = ""  # the worker pool it must go to ("" = any)
    # Called with the worker at the moment of the grant, before anything else is
    # placed, so the worker's capacity accounts for this request at once.
    on_grant: Callable[[object], None] = lambda worker: None
    granted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    seq: int = 0


class QueueFull(Exception):
    pass


class _Class:
    """One priority class: per-tenant FIFOs served by deficit round robin."""

    def __init__(self, quantum: int):
        self.quantum = quantum
        self.queues: OrderedDict[str, deque[Ticket]] = OrderedDict()  # active tenants, in round order
        self.deficit: dict[str, int] = {}
        self.in_turn: set[str] = set()  # tenants whose turn has begun (quantum already added)

    def push(self, t: Ticket) -> None:
        if t.tenant not in self.queues:
            self.queues[t.tenant] = deque()
            self.deficit.setdefault(t.tenant, 0)
        self.queues[t.tenant].append(t)

    def remove(self, t: Ticket) -> bool:
        q = self.queues.get(t.tenant)
        if q is None or t not in q:
            return False
        q.remove(t)
        if not q:
            self._forget(t.tenant)
        return True

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def peek(self) -> Ticket | None:
        """The next ticket in DRR order, advancing the round as needed (without removing it)."""
        for _ in range(len(self.queues) * 1000):
            tenant, q = next(iter(self.queues.items()))
            if tenant not in self.in_turn:  # its turn begins: one quantum of credit
                self.deficit[tenant] += self.quantum
                self.in_turn.add(tenant)
            if self.deficit[tenant] >= q[0].cost_tokens:
                return q[0]
            # Turn over: it keeps its deficit and goes to the back of the round.
            self.in_turn.discard(tenant)
            self.queues.move_to_end(tenant)
        return next(iter(self.queues.values()))[0] if self.queues else None

    def pop(self, t: Ticket) -> None:
        """Remove the ticket peek() returned (it is at the head of the first tenant's queue)."""
        self.deficit[t.tenant] -= t.cost_tokens
        q = self.queues[t.tenant]
        q.popleft()
        if not q:
            self._forget(t.tenant)

    def _forget(self, tenant: str) -> None:
        # An idle tenant does not bank credit.
        self.queues.pop(tenant, None)
        self.deficit[tenant] = 0
        self.in_turn.discard(tenant)


class Scheduler:
    """Grants queued tickets to workers as capacity allows.

    ``place(ticket)`` returns a worker with room for the ticket, or None; the
    scheduler calls it for the next ticket in order whenever something
    changes (a request queued, a request finished, a worker joined).
    """

    def __init__(self, max_queued: int, quantum: int, place: Callable[[Ticket], object | None]):
        self.max_queued = max_queued
        self.place = place
        self.classes = {p: _Class(quantum) for p in PRIORITIES}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return sum(len(c) for c in self.classes.values())

    def depth(self, priority: str) -> int:
        return len(self.classes[priority])

    def enqueue(self, t: Ticket) -> None:
        if len(self) >= self.max_queued:
            raise QueueFull()
        t.seq = next(self._seq)
        self.classes[t.priority].push(t)
        self.pump()

    def cancel(self, t: Ticket) -> None:
        """Remove a ticket that gave up (cancel or deadline); no-op once granted."""
        self.classes[t.priority].remove(t)

    def pump(self) -> None:
        """Grant as many tickets as workers have room for, in order."""
        for prio in PRIORITIES:
            cls = self.classes[prio]
            while True:
                t = cls.peek()
                if t is None:
                    break
                worker = self.place(t)
                if worker is None:
                    return  # head of the highest non-empty class must wait: keep strict order
                cls.pop(t)
                if not t.granted.done():
                    t.on_grant(worker)
                    t.granted.set_result(worker)
