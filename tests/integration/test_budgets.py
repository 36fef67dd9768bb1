"""Cost and spend budgets: three gateway processes on one real redis-server admit exactly a tenant's budget;
every request carries its cost in `done`, the log line and `igw_cost_total`; GetQuota shows spend."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gateway.state.quota import prompt_token_bound
from gateway.v1 import gateway_pb2 as gpb
from igw_worker_api.v1 import worker_pb2 as wpb
from tests.helpers import build_stack, igw_keys, make_config, new_key, quota
from tests.state_helpers import ask, log_lines, scrape, start_replica, value

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def priced(tmp_path_factory, redis_server):
    """One synthetic worker, three gateways sharing Redis. Output tokens cost 1 micro-unit each (1.00 USD per
    1M), prompt tokens nothing: a request with max_tokens N reserves exactly N and, as the synthetic engine
    always generates max_tokens, settles exactly N, so exactness does not depend on timing."""
    tmp = tmp_path_factory.mktemp("budgets")
    keys = tmp / "keys.yaml"
    igw_keys("tenant", "--file", str(keys), "unused")
    cfg = make_config(
        "synthetic",
        worker={"synthetic": {"tokens_per_s": 50}},
        gateway={
            "auth": {"mode": "api_key", "key_file": str(keys), "reload_interval_s": 0.2},
            "quota": {"store": "redis", "redis_url": redis_server.url},
            "pricing": {"currency": "EUR", "models": [{"model": MODEL, "output_per_million": 1.0}]},
        },
    )
    s = build_stack(tmp, cfg)
    s.start_worker()
    s.start_gateway()
    replicas = [start_replica(s, "gateway-b"), start_replica(s, "gateway-c")]
    yield s, keys, replicas
    s.stop()


def burst(stubs, key, n, **fields):
    barrier = threading.Barrier(n)

    def one(i):
        barrier.wait()
        try:
            return ask(stubs[i % len(stubs)], key, **fields)
        except grpc.RpcError as err:
            return err

    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(one, range(n)))


@pytest.mark.parametrize("window", ["day", "month"])
def test_budget_is_exact_across_three_gateways(priced, window):
    s, keys, replicas = priced
    tenant = f"t-budget-{window}"
    # Room for exactly 10 requests of 10 tokens (10 micro-units each), and 9 micro-units to spare.
    igw_keys("tenant", "--file", str(keys), tenant, f"--spend-per-{window}", "0.000109")
    key = new_key(keys, tenant)
    stubs = [s.gateway_stub("gateway")] + [r.stub() for r in replicas]
    results = burst(stubs, key, 30, task="spend", sampling=gpb.SamplingParams(max_tokens=10))
    ok = [r for r in results if not isinstance(r, grpc.RpcError)]
    errors = [r for r in results if isinstance(r, grpc.RpcError)]
    print(f"\nBUDGET {window}: 30 requests at once over 3 gateways, room for 10: {len(ok)} admitted")
    assert len(ok) == 10, [e.details() for e in errors][:2]
    assert all(r.done.cost_micros == 10 for r in ok)
    for err in errors:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        what = "daily" if window == "day" else "monthly"
        assert f"{what} spend budget of 0.000109 EUR reached" in err.details()
        (detail,) = [d for d in rpc_status.from_call(err).details if d.Is(error_details_pb2.QuotaFailure.DESCRIPTOR)]
        qf = error_details_pb2.QuotaFailure()
        detail.Unpack(qf)
        assert qf.violations[0].subject == f"tenant:{tenant}"
        # Come back when the window ends (at most a day / a month), never "now".
        assert 1 <= int(dict(err.trailing_metadata())["retry-after"]) <= (86_400 if window == "day" else 31 * 86_400)
    time.sleep(0.3)
    (budget,) = quota(stubs[1], key).budgets
    assert quota(stubs[1], key).currency == "EUR"
    if window == "day":
        assert (budget.spend_per_day_limit_micros, budget.spent_today_micros) == (109, 100)
    else:
        assert (budget.spend_per_month_limit_micros, budget.spent_this_month_micros) == (109, 100)
    # 9 micro-units left: a request that may cost 9 still passes, one that may cost 10 does not.
    assert ask(stubs[2], key, task="spend", sampling=gpb.SamplingParams(max_tokens=9)).done.cost_micros == 9
    with pytest.raises(grpc.RpcError):
        ask(stubs[0], key, task="spend", sampling=gpb.SamplingParams(max_tokens=1))


def test_a_request_bigger_than_the_whole_budget_is_told_so(priced):
    s, keys, _ = priced
    igw_keys("tenant", "--file", str(keys), "t-small", "--spend-per-day", "0.00001")
    key = new_key(keys, "t-small")
    with pytest.raises(grpc.RpcError) as err:
        ask(s.gateway_stub("gateway"), key, task="x", sampling=gpb.SamplingParams(max_tokens=50))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "may cost up to 0.00005 EUR but the whole daily spend budget is 0.00001 EUR" in err.value.details()
    assert "retry-after" not in dict(err.value.trailing_metadata())


def test_reserved_at_admission_and_settled_to_the_real_cost(tmp_path, redis_server):
    """With a prompt price the reservation is an upper bound (prompt bytes + max_tokens); what stays spent is
    the real cost, exactly the sum of the `done` costs, on every gateway's counter and log line."""
    keys = tmp_path / "keys.yaml"
    igw_keys("tenant", "--file", str(keys), "t-settle", "--spend-per-day", "100")
    cfg = make_config(
        "synthetic",
        worker={"synthetic": {"tokens_per_s": 100}},
        gateway={
            "auth": {"mode": "api_key", "key_file": str(keys), "reload_interval_s": 0.2},
            "quota": {"store": "redis", "redis_url": redis_server.url, "redis_key_prefix": "igw:q-settle:"},
            "pricing": {"models": [{"model": MODEL, "input_per_million": 3.0, "output_per_million": 15.0}]},
        },
    )
    s = build_stack(tmp_path, cfg)
    try:
        s.start_worker()
        s.start_gateway()
        key = new_key(keys, "t-settle")
        stub = s.gateway_stub("gateway")
        metrics = s.config["gateway"]["metrics_listen"]
        before = value(scrape(metrics), "igw_cost_total", tenant="t-settle")
        task = "price this prompt please"
        # Mid-stream, the reservation holds the real prompt + max_tokens (trimmed at acceptance).
        call = stub.Execute(
            gpb.ExecuteRequest(task=task, sampling=gpb.SamplingParams(max_tokens=100)),
            metadata=[("authorization", f"Bearer {key}")],
            timeout=30,
        )
        started = next(call).started
        time.sleep(0.2)
        held = quota(stub, key).budgets[0].spent_today_micros
        assert held == started.prompt_tokens * 3 + 100 * 15
        assert held < prompt_token_bound([wpb.ChatMessage(role="user", content=task)]) * 3 + 100 * 15
        *_, last = list(call)
        costs = [last.done.cost_micros]
        costs += [
            ask(stub, key, task=task, sampling=gpb.SamplingParams(max_tokens=n)).done.cost_micros for n in (7, 30)
        ]
        time.sleep(0.3)
        assert costs[1] == started.prompt_tokens * 3 + 7 * 15
        assert quota(stub, key).budgets[0].spent_today_micros == sum(costs)
        assert value(scrape(metrics), "igw_cost_total", tenant="t-settle") - before == pytest.approx(sum(costs) / 1e6)
        lines = [x for x in log_lines(s.log("gateway")) if x.get("tenant") == "t-settle"]
        assert [x["cost_micros"] for x in lines[-3:]] == costs
    finally:
        s.stop()
