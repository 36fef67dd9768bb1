"""Overflow pools in placement and pricing: who may burst, when, and what it costs."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.core.placement import Placement
from gateway.core.scheduler import Ticket
from gateway.metrics import GatewayMetrics
from gateway.state.quota.pricing import Pricing
from igw_common.config import ModelPrice, OverflowConfig, PlacementConfig, PoolConfig, PricingConfig


class Conn:
    def __init__(self, pool: str, overflow: bool, room: bool = True):
        self.address, self.pool, self.overflow, self.room = f"{pool}-w", pool, overflow, room
        self.outstanding_tokens = 0

    def has_room(self, cost):
        return self.room

    def claim(self, cost, prompt_tokens=0, prefill_tokens=None):
        return self


class Spec:
    def __init__(self, name, overflow):
        self.name, self.weight, self.overflow = name, 100, overflow


class Workers:
    def __init__(self, conns):
        self.workers, self.metrics = conns, GatewayMetrics()
        self.specs = [Spec("onprem", False), Spec("cloud", True)]

    def models(self):
        return {"m": self.workers}


def ticket(after_s: float | None, waited_s: float = 0.0) -> Ticket:
    t = Ticket(model="m", tenant="t", priority="interactive", cost_tokens=10, overflow_after_s=after_s)
    t.enqueued_at = time.monotonic() - waited_s
    return t


def overflowed(placement, reason):
    return placement.metrics.overflows.labels("cloud", reason)._value.get()


def test_an_overflow_pool_takes_a_request_only_once_it_waited_and_only_if_it_may_burst():
    async def go():
        onprem, cloud = Conn("onprem", False, room=False), Conn("cloud", True)
        p = Placement(Workers([onprem, cloud]), 100, PlacementConfig(strategy="least_loaded"))
        assert p.place(ticket(None, waited_s=60), set()) is None  # on-prem only: waits however long
        assert p.place(ticket(1.0, waited_s=0.2), set()) is None  # may burst, but not yet
        assert p.wanted(ticket(1.0, waited_s=0.2)) == [onprem]
        assert p.place(ticket(1.0, waited_s=1.0), set()) is cloud
        assert overflowed(p, "queue_time") == 1
        onprem.room = True  # room on-prem again: it is preferred, however long the request waited
        assert p.place(ticket(1.0, waited_s=5.0), set()) is onprem
        assert p.choose_pool("m", "any key") == ""  # the overflow pool is never a weighted choice

    asyncio.run(go())


def test_with_no_other_pool_up_a_request_that_may_burst_goes_at_once():
    async def go():
        cloud = Conn("cloud", True)
        p = Placement(Workers([cloud]), 100, PlacementConfig(strategy="least_loaded"))
        assert p.place(ticket(1.0), set()) is cloud
        assert overflowed(p, "no_primary") == 1
        assert p.place(ticket(None), set()) is None

    asyncio.run(go())


@pytest.mark.parametrize(
    "cfg, tenant, model, allowed",
    [
        ({}, "a", "m", True),
        ({"tenants": ["a"]}, "b", "m", False),
        ({"on_prem_only_tenants": ["a"]}, "a", "m", False),
        ({"on_prem_only_models": ["m"]}, "a", "m", False),
        ({"tenants": ["a"], "on_prem_only_models": ["x"]}, "a", "m", True),
    ],
)
def test_who_may_burst(cfg, tenant, model, allowed):
    assert OverflowConfig(**cfg).allows(tenant, model) is allowed


def test_a_pool_price_applies_to_its_tokens_and_reservations_take_the_dearest():
    pools = [
        PoolConfig(name="cloud", overflow=True, price=ModelPrice(model="*", input_per_million=1, output_per_million=2))
    ]
    pricing = Pricing(
        PricingConfig(default=ModelPrice(model="*", input_per_million=0.5, output_per_million=0.5)), pools
    )
    assert pricing.cost("m", 10, 10) == 10  # 0.5 micro-units a token, on-prem
    assert pricing.cost("m", 10, 10, "cloud") == 30
    assert pricing.cost("m", 10, 10, "onprem") == 10  # a pool without a price: gateway.pricing
    assert pricing.most("m", 10, 10, ["cloud"]) == 30
