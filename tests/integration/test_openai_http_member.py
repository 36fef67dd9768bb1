"""openai-http pool members, on the synthetic standin (``igw_stack.openai_http_standin``): streaming, usage,
cancel, a member that answers garbage, stalls or closes mid-stream (beside a stream that must not notice),
and an overflow pool that only tenants allowed to burst reach, at its own price.

The standin is a real process on loopback speaking OpenAI's SSE; the same member code runs against
``vllm serve`` in tests/e2e/test_openai_http_vllm.py, which is the evidence that it works with vLLM."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import grpc
import pytest

from gateway.v1 import gateway_pb2 as gpb
from tests.helpers import build_stack, free_port, igw_keys, make_config, wait_ready_workers
from tests.integration.test_observability import scrape, value

MODEL = "smollm2-135m-instruct"


def member(addr: str, **kw) -> dict:
    return {"protocol": "openai-http", "address": f"http://{addr}/v1", **kw}


def standin_load(addr: str) -> dict:
    with urllib.request.urlopen(f"http://{addr}/load", timeout=5) as r:
        return json.loads(r.read())


def run(stub, task: str, max_tokens: int = 7, md=None, timeout: float = 30):
    req = gpb.ExecuteRequest(task=task, sampling=gpb.SamplingParams(max_tokens=max_tokens))
    out = list(stub.Execute(req, metadata=md, timeout=timeout))
    assert out[0].HasField("started") and out[-1].HasField("done")
    text = "".join(r.delta.text for r in out if r.HasField("delta"))
    return out[0].started, text, out[-1].done


@pytest.fixture(scope="module")
def one_member(tmp_path_factory):
    """A gateway whose only worker is one standin member (100 tokens/s), stall timeout 1.5 s."""
    addr = f"127.0.0.1:{free_port()}"
    cfg = make_config("synthetic", gateway={"workers": [member(addr, stall_timeout_ms=1500)]})
    s = build_stack(tmp_path_factory.mktemp("openai-http"), cfg)
    try:
        s.start_openai_standin("standin", addr, "--tokens-per-s", "100", "--model", MODEL)
        s.start_gateway()
        stub = s.gateway_stub("gateway")
        wait_ready_workers(stub, 1)
        yield s, stub, addr
    finally:
        s.stop()


def test_a_stream_its_usage_and_a_cancel_that_frees_the_member(one_member):
    s, stub, addr = one_member
    started, text, done = run(stub, "count please", max_tokens=7)
    assert started.worker == f"http://{addr}/v1" and started.model == MODEL
    assert text.split() == "lorem ipsum dolor sit amet lorem ipsum".split()
    assert done.usage.completion_tokens == 7 and done.finish_reason == gpb.FINISH_REASON_LENGTH
    assert done.usage.prompt_tokens > 0  # the standin's own count, from its include_usage chunk

    # Without the usage chunk, the gateway counts: one token per content chunk.
    _, _, counted = run(stub, "misbehave:no_usage", max_tokens=5)
    assert counted.usage.completion_tokens == 5

    call = stub.Execute(gpb.ExecuteRequest(task="long", sampling=gpb.SamplingParams(max_tokens=2000)), timeout=60)
    deltas = 0
    for r in call:
        deltas += r.HasField("delta")
        if deltas == 3:
            break
    assert standin_load(addr)["open_streams"] == 1
    call.cancel()
    deadline = time.monotonic() + 5
    while standin_load(addr)["open_streams"]:
        assert time.monotonic() < deadline, "the member still streams for a client that is gone"
        time.sleep(0.05)


@pytest.mark.parametrize("fault", ["garbage", "stall", "close"])
def test_a_member_that_misbehaves_mid_stream_fails_that_request_alone(one_member, fault):
    """Garbage, a stall past stall_timeout_ms, a dropped connection: that stream ends UNAVAILABLE, saying it
    was cut; a stream beside it on the same member goes on exact, and the member keeps serving."""
    s, stub, addr = one_member
    beside: dict = {}

    def canary():
        beside["result"] = run(stub, "count please", max_tokens=300, timeout=60)

    t = threading.Thread(target=canary)
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        run(stub, f"misbehave:{fault}", max_tokens=50, timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "cut after 3 tokens" in info.value.details(), info.value.details()
    assert time.monotonic() - t0 < 10
    t.join(60)
    _, text, done = beside["result"]
    assert done.usage.completion_tokens == 300 and len(text.split()) == 300
    deadline = time.monotonic() + 5
    while standin_load(addr)["open_streams"]:  # the gateway let go of the stalled and the garbage stream
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert run(stub, "count please", max_tokens=2)[2].usage.completion_tokens == 2


def test_a_member_that_refuses_before_answering_is_retried_elsewhere_or_unavailable(one_member):
    s, stub, addr = one_member
    with pytest.raises(grpc.RpcError) as info:
        run(stub, "misbehave:error_500")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # its only worker failed it before any token


@pytest.fixture
def overflow(tmp_path):
    """Primary pool: one synthetic worker, one request at a time. Overflow pool "cloud": a standin member
    behind a bearer token from a file, at its own price. Tenant "private" is on-prem only."""
    keys, token = tmp_path / "keys.yaml", tmp_path / "cloud-token"
    token.write_text("s3cret-cloud-token\n")
    cloud = f"127.0.0.1:{free_port()}"
    cfg = make_config(
        "synthetic",
        worker={"model_name": MODEL, "synthetic": {"tokens_per_s": 50}},
        gateway={
            "auth": {"mode": "api_key", "key_file": str(keys)},
            "queue": {"max_in_flight_per_worker": 1},
            "overflow": {"after_queue_ms": 500, "on_prem_only_tenants": ["private"]},
            "pricing": {"default": {"model": "*", "input_per_million": 0.1, "output_per_million": 0.1}},
        },
    )
    cfg["gateway"]["pools"] = [
        {"name": "onprem", "workers": cfg["gateway"].pop("workers")},
        {
            "name": "cloud",
            "overflow": True,
            "price": {"model": "*", "input_per_million": 1.0, "output_per_million": 2.0},
            "workers": [member(cloud, api_key_file=str(token))],
        },
    ]
    burst = igw_keys("issue", "--file", str(keys), "--tenant", "burst")
    private = igw_keys("issue", "--file", str(keys), "--tenant", "private")
    s = build_stack(tmp_path, cfg)
    try:
        s.start_worker()
        s.start_openai_standin("cloud", cloud, "--tokens-per-s", "200", "--api-key", "s3cret-cloud-token")
        s.start_gateway()
        yield s, s.gateway_stub("gateway"), cloud, burst, private
    finally:
        s.stop()


def test_overflow_takes_only_what_the_primary_cannot_in_time_and_only_for_tenants_allowed(overflow):
    s, stub, cloud, burst, private = overflow
    metrics = s.config["gateway"]["metrics_listen"]
    md = {k: [("authorization", f"Bearer {v}")] for k, v in (("burst", burst), ("private", private))}
    wait_ready_workers(stub, 2, timeout=15, key=burst)
    primary = s.config["worker"]["listen"]

    # The primary is free: nobody overflows.
    assert run(stub, "hi", max_tokens=2, md=md["burst"])[0].worker == primary

    results: dict = {}

    def one(name, tenant, max_tokens):
        out = run(stub, "hi", max_tokens=max_tokens, md=md[tenant], timeout=60)
        results[name] = (time.monotonic(), out)  # when it ended

    blocker = threading.Thread(target=one, args=("blocker", "private", 100))  # 2 s on the primary
    blocker.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    others = [threading.Thread(target=one, args=(n, n, 10)) for n in ("private", "burst")]
    for t in others:
        t.start()
    for t in [blocker, *others]:
        t.join(60)
    assert results["blocker"][1][0].worker == primary
    # The on-prem-only tenant waited for the primary; the other went to the cloud after about 0.5 s.
    assert results["private"][1][0].worker == primary
    started, _, done = results["burst"][1]
    assert started.worker == f"http://{cloud}/v1"
    assert results["burst"][0] < results["blocker"][0]  # done before the primary freed up
    # The cloud pool's own price: 1 and 2 per 1M tokens = 1 and 2 micro-units per token.
    assert done.cost_micros == done.usage.prompt_tokens + 2 * done.usage.completion_tokens
    assert done.usage.completion_tokens == 10
    assert value(scrape(metrics), "igw_overflow_total", pool="cloud", reason="queue_time") == 1
    assert time.monotonic() - t0 < 30
    log = (s.dir / "gateway.log").read_text()
    assert "s3cret-cloud-token" not in log  # the credential is never logged
