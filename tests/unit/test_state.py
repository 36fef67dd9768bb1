"""The pure parts of cost, budgets, the response cache and sessions (no processes): pricing arithmetic, spend
windows, the local store's budgets, cache keys and the in-process stores, session trimming, config errors."""

from __future__ import annotations

import calendar

import pytest

from gateway.core.validation import ValidRequest
from gateway.doors.responses_api import parse_response_id, response_id
from gateway.metrics import GatewayMetrics
from gateway.state.cache import Entry, MemoryStore, ResponseCache, deterministic
from gateway.state.quota import Budget, Denied, LocalStore, Pricing, window_at
from gateway.state.sessions import Sessions, Turn, TurnConflict, TurnMissing, TurnNotLatest
from igw_common import config
from igw_common.config import CacheConfig, Limits, PricingConfig, QuotaLimits, SessionsConfig
from igw_worker_api.v1 import worker_pb2 as wpb

# --- pricing and windows ---------------------------------------------------------------------------


def test_cost_is_exact_integer_micro_units_rounded_up():
    p = Pricing(
        PricingConfig(models=[{"model": "m", "input_per_million": 0.15, "output_per_million": 0.6}], currency="USD")
    )
    assert p.cost("m", 1_000_000, 0) == 150_000  # 0.15 USD
    assert p.cost("m", 1000, 1000) == 150 + 600
    assert p.cost("m", 1, 0) == 1  # 0.15 micro-units: rounded up, never free
    assert p.cost("m", 3, 1) == 2  # 0.45 + 0.6 = 1.05 -> 2
    assert p.cost("other", 10**6, 10**6) == 0  # not listed: the default price, 0
    # Monotone: a reservation (upper bounds) never costs less than what it settles to.
    assert all(p.cost("m", a + 1, b) >= p.cost("m", a, b) for a in range(50) for b in range(5))


def test_windows_are_utc_days_and_calendar_months():
    t = calendar.timegm((2024, 12, 31, 23, 59, 59))
    w = window_at(t)
    assert w.month == 202412 and w.day == t // 86_400
    assert w.day_end == t + 1 and w.month_end == t + 1  # the year's last second ends both
    nxt = window_at(t + 1)
    assert (nxt.month, nxt.day) == (202501, w.day + 1)
    feb = window_at(calendar.timegm((2024, 2, 10, 12, 0, 0)))
    assert feb.month_end == calendar.timegm((2024, 3, 1, 0, 0, 0))


# --- spend budgets in the local store (the embedded default and Redis's fail-open fallback) -----------


def budget(day=0.0, month=0.0, **kw) -> list[Budget]:
    return [Budget("tenant", "acme", QuotaLimits(spend_per_day=day, spend_per_month=month, **kw), currency="USD")]


async def test_local_store_spend_budget_reserve_trim_settle_undo():
    store, b = LocalStore(), budget(day=0.0001)  # 100 micro-units a day
    await store.reserve(b, 0, "r1", 60, cost=60)
    with pytest.raises(Denied) as denied:
        await store.reserve(b, 0, "r2", 60, cost=41)
    v = denied.value.violations[0]
    assert v.kind == "spend_day" and "daily spend budget of 0.0001 USD reached" in v.description
    assert 1 <= denied.value.retry_after_s <= 86_400
    await store.adjust(b, "r1", 0, end=False, hold_cost=50)  # trimmed: 10 back
    await store.reserve(b, 0, "r2", 60, cost=41)
    assert (await store.remaining(b))[0].spent_today == 91
    await store.adjust(b, "r2", 0, end=True, hold_cost=30)  # settled at its real cost
    await store.adjust(b, "r2", 0, end=True, hold_cost=0)  # a retried settle refunds nothing more
    assert (await store.remaining(b))[0].spent_today == 80
    await store.undo(b, "r1", 60)
    assert (await store.remaining(b))[0].spent_today == 30
    with pytest.raises(Denied) as denied:
        await store.reserve(b, 0, "big", 60, cost=101)
    assert denied.value.retry_after_s is None  # bigger than the whole budget: waiting cannot help


async def test_local_store_budgets_and_buckets_are_all_or_nothing():
    store = LocalStore()
    b = budget(month=0.00005, requests_per_minute=10)
    await store.reserve(b, 0, "a", 60, cost=50)
    with pytest.raises(Denied):
        await store.reserve(b, 0, "b", 60, cost=1)
    left = (await store.remaining(b))[0]
    assert left.spent_this_month == 50 and left.requests_available == pytest.approx(9, abs=0.01)


# --- the response cache ------------------------------------------------------------------------------


def valid(**kw) -> ValidRequest:
    s = wpb.Sampling(max_tokens=kw.pop("max_tokens", 8))
    for k in ("temperature", "seed"):
        if k in kw:
            setattr(s, k, kw.pop(k))
    msgs = [wpb.ChatMessage(role="user", content=kw.pop("task", "hi"))]
    return ValidRequest(request_id="r", model="", messages=msgs, sampling=s, max_tokens_was_set=True, **kw)


def test_only_deterministic_requests_have_a_key_and_the_tenant_is_in_it():
    cache = ResponseCache(CacheConfig(enabled=True), "", GatewayMetrics())
    assert not deterministic(valid()) and cache.key("t", "m", valid(), valid().messages) is None
    greedy = valid(temperature=0.0)
    assert deterministic(greedy) and deterministic(valid(temperature=1.0, seed=3))
    assert cache.key("t", "m", valid(temperature=0.0, cache_bypass=True), greedy.messages) is None
    a = cache.key("acme", "m", greedy, greedy.messages)
    assert a == cache.key("acme", "m", valid(temperature=0.0), greedy.messages)
    assert "{t:acme}" in a
    others = [
        cache.key("other", "m", greedy, greedy.messages),
        cache.key("acme", "m2", greedy, greedy.messages),
        cache.key("acme", "m", valid(temperature=0.0, max_tokens=9), greedy.messages),
        cache.key("acme", "m", greedy, valid(task="hi!").messages),
        cache.key("acme", "m", valid(temperature=0.0, seed=1), greedy.messages),
        cache.key("acme", "m", valid(temperature=0.0, constraint=wpb.Constraint(json_object=True)), greedy.messages),
        cache.key("acme", "m", valid(temperature=0.0, constraint=wpb.Constraint(regex="a+")), greedy.messages),
    ]
    assert len({a, *others}) == 8
    # A tenant name cannot fake another's key prefix.
    assert cache.key("a}:x", "m", greedy, greedy.messages).startswith("igw:c:{t:a%7D%3Ax}:")


async def test_memory_store_evicts_least_recently_used_and_counts():
    evicted = []
    store = MemoryStore(100, lambda reason, n: evicted.append((reason, n)))
    await store.set("a", b"x" * 40, 60)
    await store.set("b", b"x" * 40, 60)
    assert await store.get("a") is not None  # a is now the most recent
    await store.set("c", b"x" * 40, 60)
    assert await store.get("b") is None and await store.get("a") is not None
    assert evicted == [("capacity", 1)] and store.bytes == 80
    await store.set("d", b"x", -1)  # expired at once
    assert await store.get("d") is None and evicted[-1] == ("expired", 1)


def test_entry_round_trip_and_unknown_formats_are_misses():
    e = Entry("m", 5, 3, "length", [("a ", 1), ("b c ", 2)])
    assert Entry.decode(e.encode()) == e and e.text == "a b c "
    assert Entry.decode(b'{"v": 2}') is None and Entry.decode(b"not json") is None


# --- sessions -----------------------------------------------------------------------------------------


def chat(task: str, max_tokens: int = 10, **kw) -> ValidRequest:
    msgs = [wpb.ChatMessage(role="user", content=task)]
    return ValidRequest(
        request_id="r",
        model="",
        messages=msgs,
        sampling=wpb.Sampling(max_tokens=max_tokens),
        max_tokens_was_set=True,
        session_id="s",
        **kw,
    )


async def test_session_trims_oldest_turns_to_the_context_and_counts_measured_tokens():
    s = Sessions(SessionsConfig(enabled=True, context_margin_tokens=0), Limits(), "", GatewayMetrics())
    for i in range(5):
        turn = await s.begin("t", chat(f"turn {i}"), 10_000)
        turn.answer.append(f"answer {i}")
        # The worker counts each turn's own 100 tokens plus the history's (100 + 20 answer + 8 template each).
        await s.commit(turn, prompt_tokens=100 + 128 * i, completion_tokens=20, finish_reason="stop")
    stored = await s.get("t", "s")
    assert [t.messages[0][1] for t in stored.turns] == [f"turn {i}" for i in range(5)]
    assert all(t.tokens == 100 + 20 + 8 for t in stored.turns)  # its own share, not the whole prompt
    # A window that fits two turns of history beside this turn and max_tokens: the three oldest go.
    need = 2 * 128 + 10 + 30  # history + max_tokens + this turn's estimate (~30)
    turn = await s.begin("t", chat("next"), need)
    assert (turn.history_turns, turn.dropped) == (2, 3)
    assert [m.content for m in turn.messages] == ["turn 3", "answer 3", "turn 4", "answer 4", "next"]
    # Not written until done: the session still has all five.
    assert len((await s.get("t", "s")).turns) == 5
    turn.answer.append("answer 5")
    await s.commit(turn, prompt_tokens=300, completion_tokens=5, finish_reason="stop")
    assert [t.messages[0][1] for t in (await s.get("t", "s")).turns] == ["turn 3", "turn 4", "next"]
    assert await s.get("other tenant", "s") is None


async def test_session_max_turns_and_bytes():
    s = Sessions(SessionsConfig(enabled=True, max_turns=3, max_session_bytes=50), Limits(), "", GatewayMetrics())
    for i in range(4):
        turn = await s.begin("t", chat(f"{i}" * 10), 10_000)
        turn.answer.append("a" * 5)
        await s.commit(turn, 20, 5, "stop")
    turns = (await s.get("t", "s")).turns
    assert len(turns) <= 3 and sum(t.size for t in turns) <= 50 + 15


async def test_a_turn_continues_only_the_latest_and_takes_only_its_number():
    s = Sessions(SessionsConfig(enabled=True), Limits(), "", GatewayMetrics())
    with pytest.raises(TurnMissing):  # nothing stored yet
        await s.begin("t", chat("x", session_follows=0), 10_000)
    first = await s.begin("t", chat("one"), 10_000)
    assert first.number == 0 and not first.checked
    first.model = "m"
    first.answer.append("a1")
    await s.commit(first, 10, 2, "length")
    # Two continuations of turn 0 at once: the first done is turn 1, the other is refused, not reordered.
    a = await s.begin("t", chat("two", session_follows=0), 10_000)
    b = await s.begin("t", chat("rival", session_follows=0), 10_000)
    assert (a.number, b.number, a.checked) == (1, 1, True)
    assert [m.content for m in a.messages] == ["one", "a1", "two"]
    await s.commit(a, 20, 3, "stop")
    with pytest.raises(TurnConflict):
        await s.commit(b, 20, 3, "stop")
    with pytest.raises(TurnNotLatest):  # the conversation went on after turn 0
        await s.begin("t", chat("late", session_follows=0), 10_000)
    with pytest.raises(TurnMissing):
        await s.begin("t", chat("ahead", session_follows=7), 10_000)
    with pytest.raises(TurnMissing):  # another tenant's session is not there
        await s.begin("u", chat("theirs", session_follows=1), 10_000)
    stored = await s.get("t", "s")
    assert [t.messages[0][1] for t in stored.turns] == ["one", "two"] and stored.next_number == 2
    # How each answer was made is kept, and survives the store's encoding.
    back = Turn.decode(stored.turn(0).encode())
    assert (back.model, back.usage, back.finish_reason, back.answer) == ("m", (10, 2), "length", "a1")
    assert back.created_at > 1_700_000_000 and stored.turn(2) is None
    assert Turn.decode('{"m": [["user", "old"]], "a": "x", "k": 3}').model == ""  # turns stored before


def test_response_ids_name_a_session_turn_in_one_spelling():
    rid = response_id("a/b c\u00e9", 12)
    assert parse_response_id(rid) == ("a/b c\u00e9", 12)
    assert parse_response_id(response_id("s", 0)) == ("s", 0)
    for bad in (
        "resp_1",
        "chatcmpl-x.1",
        rid + "x",
        rid.replace(".", ".0", 1),  # a second spelling of the number
        "resp_cw==.1",  # padded: a second spelling of "s"
        "resp_@@@@.1",
        "resp_.1",
        "resp_" + "QUFB" * 80 + ".1",  # over the length limit
        "resp_//79.1",  # not UTF-8
    ):
        assert parse_response_id(bad) is None, bad


# --- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gateway, key",
    [
        ({"jobs": {"enabled": True}}, "gateway.jobs.enabled needs Redis"),
        ({"cache": {"enabled": True, "store": "redis"}}, "gateway.cache.store: redis needs Redis"),
        ({"sessions": {"store": "redis"}}, "gateway.sessions.store: redis needs Redis"),
        ({"pricing": {"models": [{"model": "m"}, {"model": "m"}]}}, "gateway.pricing.models"),
        ({"quota": {"default_tenant_limits": {"spend_per_day": -1}}}, "spend_per_day"),
    ],
)
def test_state_config_errors_name_the_key(gateway, key):
    with pytest.raises(config.ConfigError) as err:
        config.parse({"gateway": gateway})
    assert key in str(err.value)


def test_redis_of_a_feature_is_its_own_or_the_quota_stores():
    g = config.parse({"gateway": {"quota": {"store": "redis", "redis_url": "redis://q:1/0"}}}).gateway
    assert g.redis_url_for("jobs") == "redis://q:1/0"
    g = config.parse({"gateway": {"jobs": {"enabled": True, "redis_url": "redis://j:2/0"}}}).gateway
    assert g.redis_url_for("jobs") == "redis://j:2/0"
