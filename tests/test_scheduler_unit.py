"""The admission queue's order, bound and removal, without processes."""

from __future__ import annotations


import pytest

from gateway.routing import Router, affinity_key
from gateway.scheduler import QueueFull, Scheduler, Ticket
from inference.v1 import worker_pb2 as wpb


class Slots:
    """A pool stand-in with ``n`` free slots; records the order of grants."""

    def __init__(self):
        self.free = 0
        self.order: list[str] = []

    def place(self, t: Ticket):
        if self.free <= 0:
            return None
        self.free -= 1
        self.order.append(t.tenant if t.priority == "interactive" else f"{t.tenant}/batch")
        return "worker"


def drain(s: Scheduler, slots: Slots, n: int) -> None:
    for _ in range(n):
        slots.free = 1
        s.pump()


async def test_drr_alternates_tenants_by_tokens():
    slots = Slots()
    s = Scheduler(100, 100, slots.place)
    for _ in range(6):
        s.enqueue(Ticket("m", "A", "interactive", 100))
    for _ in range(3):
        s.enqueue(Ticket("m", "B", "interactive", 100))
    s.enqueue(Ticket("m", "C", "interactive", 250))  # costs 2.5 quanta
    drain(s, slots, 10)
    assert slots.order == ["A", "B", "A", "B", "A", "B", "C", "A", "A", "A"]


async def test_flooding_tenant_cannot_starve_a_trickle():
    slots = Slots()
    s = Scheduler(1000, 100, slots.place)
    for _ in range(200):
        s.enqueue(Ticket("m", "flood", "interactive", 100))
    drain(s, slots, 5)
    s.enqueue(Ticket("m", "trickle", "interactive", 100))
    drain(s, slots, 2)
    assert "trickle" in slots.order[-2:]  # served within one round of arriving


async def test_interactive_strictly_before_batch():
    slots = Slots()
    s = Scheduler(100, 100, slots.place)
    for _ in range(3):
        s.enqueue(Ticket("m", "A", "batch", 10))
    s.enqueue(Ticket("m", "B", "interactive", 10))
    drain(s, slots, 4)
    assert slots.order == ["B", "A/batch", "A/batch", "A/batch"]


async def test_bound_and_cancel():
    slots = Slots()
    s = Scheduler(2, 100, slots.place)
    a, b = Ticket("m", "A", "interactive", 10), Ticket("m", "A", "interactive", 10)
    s.enqueue(a)
    s.enqueue(b)
    with pytest.raises(QueueFull):
        s.enqueue(Ticket("m", "B", "interactive", 10))
    s.cancel(a)
    assert len(s) == 1
    drain(s, slots, 2)
    assert b.granted.done() and not a.granted.done()


async def test_grant_hook_runs_before_the_next_placement():
    slots = Slots()
    s = Scheduler(10, 100, slots.place)
    seen = []
    t = Ticket("m", "A", "interactive", 10, on_grant=lambda w: seen.append(w))
    s.enqueue(t)
    drain(s, slots, 1)
    assert seen == ["worker"] and await t.granted == "worker"


class W:
    def __init__(self, address, load):
        self.address, self.outstanding_tokens = address, load


def test_router_affinity_beats_least_loaded():
    r = Router(10)
    busy, idle = W("a", 500), W("b", 0)
    assert r.choose("s:1", [busy, idle]) is idle  # least loaded, remembered
    idle.outstanding_tokens = 900
    assert r.choose("s:1", [busy, idle]) is idle  # affinity while it has room
    assert r.choose("s:1", [busy]) is busy  # not a candidate (full): least loaded elsewhere
    assert r.choose("", [busy, W("c", 1)]).address == "c"


def test_affinity_key_uses_session_or_prefix():
    msgs = [wpb.ChatMessage(role="system", content="ctx"), wpb.ChatMessage(role="user", content="q1")]
    assert affinity_key("abc", msgs) == "s:abc"
    same_prefix = [msgs[0], wpb.ChatMessage(role="user", content="q1")]
    assert affinity_key("", msgs) == affinity_key("", same_prefix)
    other = [wpb.ChatMessage(role="system", content="other"), msgs[1]]
    assert affinity_key("", msgs) != affinity_key("", other)
