"""Metrics, the request log line and traces, checked against real calls."""

from __future__ import annotations

import json
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.v1 import gateway_pb2 as gpb


def scrape(addr: str, path: str = "/metrics") -> dict[tuple, float]:
    """{(sample name, sorted label items): value}"""
    text = urllib.request.urlopen(f"http://{addr}{path}", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in m.items() if n == name and set(labels.items()) <= set(ls))


def delta(before, after, name, **labels):
    return value(after, name, **labels) - value(before, name, **labels)


def test_gateway_and_worker_metrics_move_by_the_right_amounts(synthetic_stack):
    s = synthetic_stack
    gw_metrics, wk_metrics = s.config["gateway"]["metrics_listen"], s.config["worker"]["metrics_listen"]
    before, wbefore = scrape(gw_metrics), scrape(wk_metrics)
    stub = s.gateway_stub("envoy")
    usages = []
    for n in (3, 5, 7):
        out = list(
            stub.Execute(gpb.ExecuteRequest(task="hello there", sampling=gpb.SamplingParams(max_tokens=n)), timeout=30)
        )
        usages.append(out[-1].done.usage)
    with pytest.raises(grpc.RpcError):
        list(stub.Execute(gpb.ExecuteRequest(task=""), timeout=30))
    call = stub.Execute(gpb.ExecuteRequest(task="long", sampling=gpb.SamplingParams(max_tokens=500)), timeout=30)
    for r in call:
        if r.WhichOneof("event") == "started":
            cancelled_prompt = r.started.prompt_tokens
        if r.WhichOneof("event") == "delta":
            break
    call.cancel()
    time.sleep(0.5)
    after, wafter = scrape(gw_metrics), scrape(wk_metrics)

    model = "smollm2-135m-instruct"
    assert delta(before, after, "igw_requests_total", code="OK", model=model, tenant="anonymous") == 3
    assert delta(before, after, "igw_requests_total", code="INVALID_ARGUMENT") == 1
    assert delta(before, after, "igw_requests_total", code="CANCELLED") == 1
    assert delta(before, after, "igw_rejections_total", reason="invalid_argument") == 1
    out_tokens = sum(u.completion_tokens for u in usages)
    in_tokens = sum(u.prompt_tokens for u in usages)
    cancelled_tokens = delta(before, after, "igw_tokens_total", type="output") - out_tokens
    assert cancelled_tokens >= 1  # the cancelled stream's tokens are accounted too
    assert delta(before, after, "igw_tokens_total", type="input", tenant="anonymous") == in_tokens + cancelled_prompt
    assert delta(before, after, "igw_time_to_first_token_seconds_count", model=model) == 4
    assert delta(before, after, "igw_request_duration_seconds_count", model=model) == 4
    assert delta(before, after, "igw_queue_wait_seconds_count", model=model, priority="interactive") == 4
    # One inter-token gap per token after the first of each completed stream (the cancelled one adds its own).
    assert delta(before, after, "igw_inter_token_latency_seconds_count", model=model) >= out_tokens - 3
    assert delta(before, after, "igw_aborts_total", reason="cancelled") == 1
    assert delta(before, after, "igw_abort_latency_seconds_count") == 1
    assert value(after, "igw_active_streams") == 0
    assert value(after, "igw_queue_depth", priority="interactive") == 0
    assert value(after, "igw_worker_up", worker=s.worker) == 1
    # The worker's own counts agree with what the clients received.
    assert delta(wbefore, wafter, "igw_worker_requests_total") == 4
    assert delta(wbefore, wafter, "igw_worker_requests_aborted_total") == 1
    assert delta(wbefore, wafter, "igw_worker_completion_tokens_total") == delta(
        before, after, "igw_tokens_total", type="output"
    ) + delta(before, after, "igw_tokens_after_cancel_total")
    assert delta(wbefore, wafter, "igw_worker_abort_seconds_count") == 1
    assert value(wafter, "igw_worker_engine_unfinished_requests") == 0
    # Envoy's own stats, from its admin interface.
    envoy = scrape(s.envoy_admin, "/stats/prometheus")
    clusters = ("gateway", "gateway_native")  # gateway_native: Execute through the native relay, when on
    assert sum(value(envoy, "envoy_cluster_upstream_rq_total", envoy_cluster_name=c) for c in clusters) >= 5


def test_one_json_log_line_per_request(synthetic_stack):
    s = synthetic_stack
    out = list(
        s.gateway_stub("envoy").Execute(
            gpb.ExecuteRequest(
                task="a secret prompt", request_id="log-line-1", sampling=gpb.SamplingParams(max_tokens=4)
            ),
            timeout=30,
        )
    )
    done = out[-1].done
    time.sleep(0.2)
    lines = [json.loads(line) for line in s.log("gateway").read_text().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("event") == "request" and line.get("request_id") == "log-line-1"]
    assert len(mine) == 1
    entry = mine[0]
    assert entry["status"] == "OK" and entry["level"] == "info" and entry["component"] == "gateway"
    assert (entry["tenant"], entry["model"], entry["worker"], entry["finish_reason"]) == (
        "anonymous",
        "smollm2-135m-instruct",
        s.worker,
        "length",
    )
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (done.usage.prompt_tokens, 4)
    assert entry["ttft_ms"] <= entry["total_ms"] and entry["queue_ms"] <= entry["ttft_ms"]
    assert "a secret prompt" not in s.log("gateway").read_text()  # no prompt text unless log_prompts


@pytest.mark.vllm
def test_token_metrics_equal_usage_with_vllm(vllm_stack):
    addr = vllm_stack.config["gateway"]["metrics_listen"]
    before = scrape(addr)
    out = list(
        vllm_stack.gateway_stub("envoy").Execute(
            gpb.ExecuteRequest(task="Name three colors.", sampling=gpb.SamplingParams(max_tokens=20, temperature=0)),
            timeout=60,
        )
    )
    usage = out[-1].done.usage
    after = scrape(addr)
    assert delta(before, after, "igw_tokens_total", type="output") == usage.completion_tokens
    assert delta(before, after, "igw_tokens_total", type="input") == usage.prompt_tokens
    assert delta(before, after, "igw_time_to_first_token_seconds_count") == 1
