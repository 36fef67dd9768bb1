"""The in-process quota store on a fake clock: atomic reserve, refill, leases, adjust and undo."""

from __future__ import annotations

import pytest

from gateway.state.quota import Budget, Denied, LocalStore
from igw_common.config import QuotaLimits


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def budgets(rpm=0, tpm=0, conc=0):
    return [
        Budget(
            "key",
            "k1",
            QuotaLimits(requests_per_minute=rpm, tokens_per_minute=tpm, concurrent_streams=conc),
            tenant="t",
        ),
        Budget("tenant", "t", QuotaLimits(tokens_per_minute=tpm * 2)),
    ]


async def test_all_or_nothing_across_budgets():
    store = LocalStore(Clock())
    b = budgets(rpm=2, tpm=100)
    await store.reserve(b, 60, "a", 300)
    with pytest.raises(Denied) as info:
        await store.reserve(b, 60, "b", 300)  # the key's tokens are short, the tenant's are not
    assert [v.kind for v in info.value.violations] == ["tokens"]
    left = await store.remaining(b)
    assert left[0].requests_available == 1 and left[0].tokens_available == 40
    assert left[1].tokens_available == 140  # nothing charged to the tenant by the refused call


async def test_refill_is_continuous_and_capped():
    clock = Clock()
    store = LocalStore(clock)
    b = budgets(tpm=600)
    await store.reserve(b, 600, "a", 300)
    clock.now += 30  # half a minute: half the budget back
    assert (await store.remaining(b))[0].tokens_available == pytest.approx(300)
    clock.now += 600
    assert (await store.remaining(b))[0].tokens_available == 600


async def test_denial_says_how_long_to_wait_or_that_waiting_cannot_help():
    store = LocalStore(Clock())
    b = budgets(tpm=60)
    await store.reserve(b, 60, "a", 300)
    with pytest.raises(Denied) as info:
        await store.reserve(b, 30, "b", 300)
    assert info.value.retry_after_s == pytest.approx(30, abs=0.5)  # 1 token/s
    with pytest.raises(Denied) as info:
        await store.reserve(b, 61, "c", 300)
    assert info.value.retry_after_s is None  # over the whole budget


async def test_leases_end_on_adjust_or_expire():
    clock = Clock()
    store = LocalStore(clock)
    b = budgets(conc=1)
    await store.reserve(b, 10, "a", 5)
    with pytest.raises(Denied):
        await store.reserve(b, 10, "b", 5)
    await store.adjust(b, "a", 0, end=True)
    await store.reserve(b, 10, "b", 5)
    clock.now += 6  # not renewed: expired
    await store.reserve(b, 10, "c", 5)


async def test_adjust_keeps_only_what_is_held_and_is_idempotent():
    store = LocalStore(Clock())
    b = budgets(tpm=1000)
    await store.reserve(b, 800, "a", 300)
    for _ in range(3):
        await store.adjust(b, "a", 300, end=False)  # trim to 300, three times: refunds once
    assert (await store.remaining(b))[0].tokens_available == pytest.approx(700)
    await store.adjust(b, "a", 100, end=True)
    await store.adjust(b, "a", 100, end=True)
    assert (await store.remaining(b))[0].tokens_available == pytest.approx(900)


async def test_idle_subjects_leave_no_state():
    clock = Clock()
    store = LocalStore(clock)
    for i in range(2000):
        b = [Budget("tenant", f"user-{i}", QuotaLimits(requests_per_minute=10, concurrent_streams=2))]
        await store.reserve(b, 1, f"l{i}", 30)
        await store.adjust(b, f"l{i}", 0, end=True)
    assert store.entries() >= 2000
    clock.now += 2 * LocalStore.SWEEP_S  # buckets full again, leases and their records expired
    await store.reserve([Budget("tenant", "x", QuotaLimits(requests_per_minute=1))], 1, "x", 30)
    assert store.entries() <= 2
