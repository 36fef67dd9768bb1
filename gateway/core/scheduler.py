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
  (Shreedhar & Varghese, 1995) with the request's estimated tokens
  (prompt + max_tokens) as its cost: each tenant with queued work gets a
  quantum of ``gateway.queue.drr_quantum_tokens`` per round and sends
  requests while its deficit covers them. A tenant that floods only lengthens
  its own queue; another tenant waits at most about one round (one quantum
  per backlogged tenant) behind it.

No head-of-line blocking: a request that cannot be placed now (its model's
workers are full, or it is too large for the room they have) is passed over
and the requests behind it that can be placed go. So that passing over
cannot starve it, a blocked request *holds* the workers it could use: at
once against lower priority classes (strict priority), and against its own
class once it has waited ``gateway.queue.max_bypass_ms``. Nothing else is
placed on a held worker, so the blocked request gets the first room there.

Bounded: at most ``gateway.queue.max_queued`` requests wait; beyond that a
new request is refused at once (RESOURCE_EXHAUSTED with a retry hint). A
request whose deadline passes or whose client cancels while queued is
removed at once and never reaches a worker.

Placement (``Placer.place``) claims the worker's capacity itself and returns
the claim; the scheduler only hands the claim to the waiting request. No
request code runs inside ``pump``, so a fault in one request cannot stop the
queue, and ``pump`` isolates a failing placement to its own ticket.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from gateway.vocabulary import PRIORITIES

if TYPE_CHECKING:
    from gateway.core.placement import PromptBlocks

log = logging.getLogger("gateway.core.scheduler")


class Claim(Protocol):
    """Room on one worker, held for one request until ``release()``."""

    def release(self) -> None: ...


class Placer(Protocol):
    def place(self, ticket: "Ticket", held: set) -> Claim | None:
        """Claim room for the ticket on a worker not in ``held``, or None."""

    def wanted(self, ticket: "Ticket") -> Iterable:
        """The workers that could take the ticket once they have room."""


@dataclass(eq=False)
class Ticket:
    """One queued request; ``granted`` resolves to the claim on the worker it may use."""

    model: str
    tenant: str
    priority: str
    cost_tokens: int
    prompt_tokens: int = 0  # of cost_tokens, the prompt's (an estimate)
    affinity: str = ""  # session or prompt-prefix hash: prefer the worker that served it before
    exclude: frozenset = frozenset()  # workers that already failed this request
    pool: str = ""  # the worker pool it must go to ("" = any)
    prompt: "PromptBlocks | None" = None  # its prompt's prefix blocks, for placement by cached prefix
    overflow_after_s: float | None = None  # queue time after which an overflow pool may take it; None = never
    granted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    enqueued_at: float = field(default_factory=time.monotonic)
    seq: int = 0


class QueueFull(Exception):
    pass


class _Class:
    """One priority class: per-tenant FIFOs served by deficit round robin."""

    def __init__(self, quantum: int):
        self.quantum = quantum
        self.queues: OrderedDict[str, deque[Ticket]] = OrderedDict()  # tenants with queued work, in round order
        self.deficit: dict[str, int] = {}  # only tenants with queued work: idle tenants leave no state behind
        self.in_turn: set[str] = set()  # tenants whose turn has begun (quantum already added)
        self.size = 0

    def push(self, t: Ticket) -> None:
        if t.tenant not in self.queues:
            self.queues[t.tenant] = deque()
            self.deficit[t.tenant] = 0
        self.queues[t.tenant].append(t)
        self.size += 1

    def remove(self, t: Ticket) -> bool:
        q = self.queues.get(t.tenant)
        if q is None:
            return False
        try:
            q.remove(t)
        except ValueError:
            return False
        self.size -= 1
        if not q:
            self._forget(t.tenant)
        return True

    def peek(self, skip: set[Ticket]) -> Ticket | None:
        """The next ticket in DRR order among those not in ``skip`` (without removing it).

        A tenant whose queued tickets are all skipped is passed over without
        touching its credit, as if it had no work this time."""
        heads = {}
        for tenant, q in self.queues.items():
            head = next((t for t in q if t not in skip), None)
            if head is not None:
                heads[tenant] = head
        if not heads:
            return None
        while True:
            for tenant in list(self.queues):
                head = heads.get(tenant)
                if head is None:
                    continue
                if tenant not in self.in_turn:  # its turn begins: one quantum of credit
                    self.deficit[tenant] += self.quantum
                    self.in_turn.add(tenant)
                if self.deficit[tenant] >= head.cost_tokens:
                    return head
                # Turn over: it keeps its deficit and goes to the back of the round.
                self.in_turn.discard(tenant)
                self.queues.move_to_end(tenant)
            # A whole round and nobody could send: skip the rounds in which nothing changes
            # (costs far above the quantum would otherwise take thousands of loops).
            rounds = min(math.ceil((h.cost_tokens - self.deficit[t]) / self.quantum) for t, h in heads.items())
            if rounds > 1:
                for t in heads:
                    self.deficit[t] += (rounds - 1) * self.quantum

    def save(self) -> tuple:
        """The round's state, to undo what a peek did when its ticket cannot be placed: a tenant
        passed over for lack of room keeps its place and credit as if it had not been visited."""
        return dict(self.deficit), set(self.in_turn), list(self.queues)

    def restore(self, state: tuple) -> None:
        deficit, in_turn, order = state
        self.deficit, self.in_turn = deficit, in_turn
        self.queues = OrderedDict((tenant, self.queues[tenant]) for tenant in order)

    def pop(self, t: Ticket) -> None:
        """Remove a ticket peek() returned; its tenant's turn goes on while its deficit lasts."""
        self.deficit[t.tenant] -= t.cost_tokens
        q = self.queues[t.tenant]
        if q[0] is t:
            q.popleft()
        else:
            q.remove(t)
        self.size -= 1
        if not q:
            self._forget(t.tenant)

    def _forget(self, tenant: str) -> None:
        # An idle tenant neither banks credit nor keeps state.
        self.queues.pop(tenant, None)
        self.deficit.pop(tenant, None)
        self.in_turn.discard(tenant)


class Scheduler:
    """Grants queued tickets to workers as capacity allows (see the module docstring)."""

    def __init__(self, max_queued: int, quantum: int, placer: Placer, max_bypass_s: float = 2.0):
        self.max_queued = max_queued
        self.placer = placer
        self.max_bypass_s = max_bypass_s
        self.classes = {p: _Class(quantum) for p in PRIORITIES}
        self._seq = itertools.count()
        self._pumping = False
        self._again = False

    def __len__(self) -> int:
        return sum(c.size for c in self.classes.values())

    def depth(self, priority: str) -> int:
        return self.classes[priority].size

    def enqueue(self, t: Ticket) -> None:
        if len(self) >= self.max_queued:
            raise QueueFull()
        t.seq = next(self._seq)
        self.classes[t.priority].push(t)
        self.pump()
        if t.overflow_after_s is not None and not t.granted.done():
            # Its wait makes it eligible for an overflow pool then, with no other change to pump for. A timer
            # may fire a clock tick early: 10 ms late rather than a tick too soon, when it is not eligible yet.
            due = t.overflow_after_s - (time.monotonic() - t.enqueued_at) + 0.01
            asyncio.get_running_loop().call_later(max(0.0, due), self.pump)

    def cancel(self, t: Ticket) -> None:
        """Remove a ticket that gave up (cancel or deadline); no-op once granted.

        It may have been holding workers or blocking a round: pump, so nobody
        behind it waits for a change that already happened."""
        if self.classes[t.priority].remove(t):
            self.pump()

    async def wait(self, t: Ticket, timeout_s: float | None) -> Claim:
        """Queue ``t`` and wait for its claim. On cancel or timeout it leaves the queue at once,
        and a claim granted at that very moment is given back."""
        self.enqueue(t)
        granted = t.granted
        if granted.done() and not granted.cancelled() and granted.exception() is None:
            return granted.result()  # a worker had room at once: no timer to arm, nothing to wait for
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(t.granted)
        except BaseException:
            if t.granted.done():
                if not t.granted.cancelled() and t.granted.exception() is None:
                    t.granted.result().release()
            else:
                t.granted.cancel()
                self.cancel(t)
            raise

    def pump(self) -> None:
        """Grant as many tickets as workers have room for, in order (re-entrant calls fold into one)."""
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._pump_once()
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        held: set = set()  # workers kept free for a blocked ticket ahead in order
        now = time.monotonic()
        for prio in PRIORITIES:
            cls = self.classes[prio]
            blocked: set[Ticket] = set()
            while cls.size:  # most classes are empty most of the time: nothing to save or peek
                state = cls.save()
                t = cls.peek(blocked)
                if t is None:
                    break
                try:
                    claim = self.placer.place(t, held)
                except Exception as err:  # a bug in placement fails this ticket alone
                    log.exception("placement failed for a request of tenant %s", t.tenant)
                    cls.pop(t)
                    if not t.granted.done():
                        t.granted.set_exception(err)
                    continue
                if claim is None:
                    cls.restore(state)
                    blocked.add(t)
                    if now - t.enqueued_at >= self.max_bypass_s:
                        held.update(self.placer.wanted(t))
                    continue
                cls.pop(t)
                if t.granted.done():  # its waiter gave up in this very pass
                    claim.release()
                else:
                    t.granted.set_result(claim)
            # Strict priority: lower classes may not take room a blocked ticket of this class wants.
            for t in blocked:
                held.update(self.placer.wanted(t))
