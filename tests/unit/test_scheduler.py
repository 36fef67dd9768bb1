"""The admission queue's order, bound, removal and passing-over, without processes."""

from __future__ import annotations

import asyncio

import pytest

from gateway.core.scheduler import QueueFull, Scheduler, Ticket


class Slot:
    def __init__(self, worker: "Worker", cost: int):
        self.worker, self.cost, self.held = worker, cost, True

    def release(self):
        if self.held:
            self.held = False
            self.worker.used -= self.cost


class Worker:
    def __init__(self, name: str, model: str = "m", capacity: int = 10**12):
        self.name, self.model, self.capacity, self.used = name, model, capacity, 0


class Placer:
    """A worker set stand-in: workers with a token capacity; ``free`` grants left (None = unlimited)."""

    def __init__(self, *workers: Worker):
        self.workers = list(workers) or [Worker("w")]
        self.free: int | None = 0
        self.order: list[str] = []

    def wanted(self, t: Ticket):
        return [w for w in self.workers if w.model == t.model]

    def place(self, t: Ticket, held: set):
        if self.free is not None and self.free <= 0:
            return None
        for w in self.wanted(t):
            if w not in held and w.used + t.cost_tokens <= w.capacity:
                if self.free is not None:
                    self.free -= 1
                w.used += t.cost_tokens
                self.order.append(t.tenant if t.priority == "interactive" else f"{t.tenant}/batch")
                return Slot(w, t.cost_tokens)
        return None


def drain(s: Scheduler, placer: Placer, n: int) -> None:
    for _ in range(n):
        placer.free = 1
        s.pump()


async def test_drr_alternates_tenants_by_tokens():
    placer = Placer()
    s = Scheduler(100, 100, placer)
    for _ in range(6):
        s.enqueue(Ticket("m", "A", "interactive", 100))
    for _ in range(3):
        s.enqueue(Ticket("m", "B", "interactive", 100))
    s.enqueue(Ticket("m", "C", "interactive", 250))  # costs 2.5 quanta
    drain(s, placer, 10)
    assert placer.order == ["A", "B", "A", "B", "A", "B", "C", "A", "A", "A"]


async def test_huge_cost_is_reached_without_looping_round_by_round():
    placer = Placer()
    s = Scheduler(100, 1, placer)
    s.enqueue(Ticket("m", "A", "interactive", 10**9))
    s.enqueue(Ticket("m", "B", "interactive", 10**9 + 5))
    drain(s, placer, 2)
    assert placer.order == ["A", "B"]


async def test_flooding_tenant_cannot_starve_a_trickle():
    placer = Placer()
    s = Scheduler(1000, 100, placer)
    for _ in range(200):
        s.enqueue(Ticket("m", "flood", "interactive", 100))
    drain(s, placer, 5)
    s.enqueue(Ticket("m", "trickle", "interactive", 100))
    drain(s, placer, 2)
    assert "trickle" in placer.order[-2:]  # served within one round of arriving


async def test_interactive_strictly_before_batch():
    placer = Placer()
    s = Scheduler(100, 100, placer)
    for _ in range(3):
        s.enqueue(Ticket("m", "A", "batch", 10))
    s.enqueue(Ticket("m", "B", "interactive", 10))
    drain(s, placer, 4)
    assert placer.order == ["B", "A/batch", "A/batch", "A/batch"]


async def test_bound_and_cancel():
    placer = Placer()
    s = Scheduler(2, 100, placer)
    a, b = Ticket("m", "A", "interactive", 10), Ticket("m", "A", "interactive", 10)
    s.enqueue(a)
    s.enqueue(b)
    with pytest.raises(QueueFull):
        s.enqueue(Ticket("m", "B", "interactive", 10))
    s.cancel(a)
    assert len(s) == 1
    drain(s, placer, 2)
    assert b.granted.done() and not a.granted.done()


async def test_idle_tenants_leave_no_state():
    placer = Placer()
    placer.free = None
    s = Scheduler(100, 100, placer)
    for i in range(50):
        s.enqueue(Ticket("m", f"user-{i}", "interactive", 10))
    assert len(s) == 0
    assert all(not c.deficit and not c.queues and not c.in_turn for c in s.classes.values())


async def test_blocked_request_does_not_stop_requests_that_fit():
    """Head-of-line: a request too large for the room left waits; a small one behind it goes,
    and one for another model is never held up."""
    small_worker, other = Worker("w", capacity=100), Worker("x", model="other")
    placer = Placer(small_worker, other)
    placer.free = None
    s = Scheduler(100, 1000, placer, max_bypass_s=60)
    running = placer.place(Ticket("m", "A", "interactive", 60), set())
    big = Ticket("m", "A", "interactive", 80)
    s.enqueue(big)
    small, elsewhere = Ticket("m", "B", "interactive", 30), Ticket("other", "B", "interactive", 30)
    s.enqueue(small)
    s.enqueue(elsewhere)
    assert small.granted.done() and elsewhere.granted.done() and not big.granted.done()
    running.release()
    small.granted.result().release()
    s.pump()
    assert big.granted.done()


async def test_blocked_request_holds_its_workers_after_the_bypass_window():
    """No starvation: once a blocked request has waited max_bypass_s, nothing else is placed on the
    workers it could use, so it gets the first room there."""
    worker = Worker("w", capacity=100)
    placer = Placer(worker)
    placer.free = None
    s = Scheduler(100, 1000, placer, max_bypass_s=0.05)
    running = placer.place(Ticket("m", "A", "interactive", 60), set())
    big = Ticket("m", "A", "interactive", 80)
    s.enqueue(big)
    await asyncio.sleep(0.1)
    late_small = Ticket("m", "B", "interactive", 30)
    s.enqueue(late_small)
    assert not late_small.granted.done()  # it would fit, but the big one has waited long enough
    running.release()
    s.pump()
    assert big.granted.done() and not late_small.granted.done()


async def test_lower_class_cannot_take_room_a_blocked_higher_class_wants():
    worker = Worker("w", capacity=100)
    placer = Placer(worker)
    placer.free = None
    s = Scheduler(100, 1000, placer, max_bypass_s=60)
    placer.place(Ticket("m", "A", "interactive", 60), set())
    big = Ticket("m", "A", "interactive", 80)
    batch = Ticket("m", "B", "batch", 10)
    s.enqueue(big)
    s.enqueue(batch)
    assert not batch.granted.done()


async def test_cancel_of_a_blocking_ticket_wakes_the_rest():
    """Lost wakeup: removing the ticket that held a worker must let the others go at once."""
    worker = Worker("w", capacity=100)
    placer = Placer(worker)
    placer.free = None
    s = Scheduler(100, 1000, placer, max_bypass_s=0)
    running = placer.place(Ticket("m", "A", "interactive", 60), set())
    big = Ticket("m", "A", "interactive", 80)
    s.enqueue(big)
    small = Ticket("m", "B", "interactive", 30)
    s.enqueue(small)
    assert not small.granted.done()  # held for the big one (bypass window 0)
    s.cancel(big)
    assert small.granted.done()
    running.release()


async def test_failing_placement_fails_one_ticket_only():
    class Broken(Placer):
        def place(self, t, held):
            if t.tenant == "bad":
                raise RuntimeError("bug")
            return super().place(t, held)

    placer = Broken()
    placer.free = None
    s = Scheduler(100, 100, placer)
    bad, good = Ticket("m", "bad", "interactive", 10), Ticket("m", "good", "interactive", 10)
    s.enqueue(bad)
    s.enqueue(good)
    assert isinstance(bad.granted.exception(), RuntimeError)
    assert good.granted.result() is not None
    assert len(s) == 0


async def test_wait_gives_back_a_claim_granted_as_the_waiter_gives_up():
    worker = Worker("w", capacity=100)
    placer = Placer(worker)
    s = Scheduler(100, 100, placer)
    t = Ticket("m", "A", "interactive", 40)
    waiter = asyncio.ensure_future(s.wait(t, None))
    await asyncio.sleep(0)
    placer.free = 1
    s.pump()  # granted ...
    waiter.cancel()  # ... and abandoned before the waiter ran
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert worker.used == 0


async def test_wait_timeout_leaves_the_queue():
    placer = Placer()
    s = Scheduler(100, 100, placer)
    t = Ticket("m", "A", "interactive", 40)
    with pytest.raises(TimeoutError):
        await s.wait(t, 0.05)
    assert len(s) == 0
