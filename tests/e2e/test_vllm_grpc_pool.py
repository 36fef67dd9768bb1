"""One pool, two kinds of real vLLM workers, through Envoy: a stock vLLM gRPC server (vllm_engine.proto,
nothing of ours on it) and our own worker (inference.v1, vLLM in-process), both serving SmolLM2.

Execute is served from both; cancel and deadline reach the engine on both (each engine's own count of
requests back to 0); exact token counts; failover from one kind to the other.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from smg_grpc_proto import vllm_engine_pb2 as vpb
from smg_grpc_proto import vllm_engine_pb2_grpc as vpb_grpc

from bench import kv_placement
from gateway.v1 import gateway_pb2 as gpb
from tests.helpers import TcpProxy, build_stack, make_config
from tests.integration.test_observability import scrape, value

pytestmark = pytest.mark.vllm


def stock_running(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        loads = vpb_grpc.VllmEngineStub(ch).GetLoads(vpb.GetLoadsRequest(), timeout=5).loads
    return sum(x.num_running_reqs + x.num_waiting_reqs for x in loads)


def wait_for(predicate, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout_s, what
        time.sleep(0.05)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def pool(vllm_stack, stock_vllm_grpc, tmp_path_factory):
    """A gateway and Envoy of their own in front of both workers (each already running for the session).
    The gateway reaches the stock server through a TCP relay, so a test can cut it off and restore it."""
    relay = TcpProxy(stock_vllm_grpc.worker)
    relay.start()
    cfg = make_config("vllm")
    stock = {
        "address": relay.address,
        "protocol": "vllm-grpc",
        "kv_events_endpoint": stock_vllm_grpc.kv_events_endpoint,
        "kv_events_topic": "kv",
    }
    cfg["gateway"]["workers"] = [stock, {"address": vllm_stack.worker}]
    s = build_stack(tmp_path_factory.mktemp("mixed-pool"), cfg)
    try:
        s.start_gateway()
        s.start_envoy()
        stub = s.gateway_stub("envoy")
        wait_for(lambda: ready_workers(stub) == 2, 120, "both workers never became ready")
        yield s, stub, relay, vllm_stack
    finally:
        s.stop()


def ready_workers(stub) -> int:
    return stub.ListModels(gpb.ListModelsRequest(), timeout=5).models[0].ready_workers


def run(stub, req, timeout=180):
    return list(stub.Execute(req, timeout=timeout))


def test_execute_is_served_from_both_kinds_with_exact_counts(pool):
    from transformers import AutoTokenizer

    from inference import embedded_model

    s, stub, relay, ours = pool
    hf = AutoTokenizer.from_pretrained(str(embedded_model.model_dir()))
    tasks = [f"Count from {i} to 50, one number per line." for i in range(1, 5)]

    def one(task):
        return run(stub, gpb.ExecuteRequest(task=task, sampling=gpb.SamplingParams(max_tokens=24, temperature=0)))

    with ThreadPoolExecutor(2) as ex:  # two at a time: the least loaded worker is the other one
        outs = list(ex.map(one, tasks))
    workers = set()
    for task, out in zip(tasks, outs):
        tokens = sum(r.delta.tokens for r in out if r.HasField("delta"))
        text = "".join(r.delta.text for r in out if r.HasField("delta"))
        done = out[-1].done
        assert done.usage.completion_tokens == tokens and text.strip(), (out[0].started.worker, done)
        assert tokens == 24 if done.finish_reason == gpb.FINISH_REASON_LENGTH else tokens < 24
        prompt = hf.apply_chat_template([{"role": "user", "content": task}], tokenize=False, add_generation_prompt=True)
        assert out[0].started.prompt_tokens == len(hf.encode(prompt, add_special_tokens=False))
        workers.add(out[0].started.worker)
    assert workers == {relay.address, ours.worker}


def test_both_kinds_report_their_prefix_cache_and_a_shared_prefix_follows_it(pool):
    """The stock server's own KV-event publisher (read by the gateway) and our worker's stream both fill
    the gateway's index; a prompt whose prefix one of them holds goes there, and vLLM reuses it."""
    s, stub, relay, ours = pool
    metrics = s.config["gateway"]["metrics_listen"]
    system = gpb.ChatMessage(role="system", content=kv_placement.system_prompt("mixed-pool", 400))

    def ask(q: str) -> gpb.ExecuteRequest:
        msgs = [system, gpb.ChatMessage(role="user", content=q)]
        return gpb.ExecuteRequest(messages=msgs, sampling=gpb.SamplingParams(max_tokens=2))

    def run_one(req):
        out = run(stub, req)
        return out[0].started.worker, out[-1].done.usage

    # Two at once, nothing cached yet: one on each kind (least load); both now hold the prefix.
    with ThreadPoolExecutor(2) as ex:
        firsts = list(ex.map(run_one, [ask("First question?"), ask("Second question?")]))
    assert {w for w, _ in firsts} == {relay.address, ours.worker}
    blocks = firsts[0][1].prompt_tokens // 128
    wait_for(
        lambda: all(value(scrape(metrics), "igw_worker_cached_blocks", worker=w) >= blocks for w, _ in firsts),
        10,
        "the gateway never learned the blocks of both engines",
    )
    # A third sharing the prefix: wherever it goes, that engine holds the prefix and reuses it.
    _, usage = run_one(ask("Third question?"))
    assert usage.cached_prompt_tokens >= blocks * 128
    assert value(scrape(metrics), "igw_placements_total", strategy="kv_cache") >= 1


def test_cancel_and_deadline_reach_both_engines(pool):
    s, stub, relay, ours = pool
    stock = relay.target
    for i in range(4):  # cancels land on both kinds; after each, both engines hold nothing
        call = stub.Execute(
            gpb.ExecuteRequest(task=f"Count from {i} to 500.", sampling=gpb.SamplingParams(max_tokens=800)), timeout=180
        )
        for r in call:
            if r.HasField("delta"):
                break
        call.cancel()
        wait_for(lambda: stock_running(stock) == 0, 5, "the stock server kept the cancelled request")
        assert ours.wait_worker_idle(5)[0].engine_unfinished_requests == 0
    for i in range(2):
        with pytest.raises(grpc.RpcError) as info:
            run(
                stub,
                gpb.ExecuteRequest(
                    task=f"Write a very long story about dragon number {i}.",
                    sampling=gpb.SamplingParams(max_tokens=800),
                ),
                timeout=1.5,
            )
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: stock_running(stock) == 0, 5, "the stock server kept a request past its deadline")
    assert ours.wait_worker_idle(5)[0].engine_unfinished_requests == 0


def test_cancel_on_the_stock_server_specifically(pool):
    s, stub, relay, ours = pool
    for i in range(8):  # until one lands there (least loaded, ties alternate with the prompt)
        call = stub.Execute(
            gpb.ExecuteRequest(task=f"Count from {i} to 900.", sampling=gpb.SamplingParams(max_tokens=800)), timeout=180
        )
        first = next(iter(call))
        if first.started.worker == relay.address:
            break
        call.cancel()
    assert first.started.worker == relay.address
    wait_for(lambda: stock_running(relay.target) == 1, 5, "the stock server does not show the request")
    call.cancel()
    waited = wait_for(lambda: stock_running(relay.target) == 0, 5, "the cancel never reached vLLM")
    assert waited < 2.0


def test_failover_from_the_stock_server_to_our_worker_and_back(pool):
    s, stub, relay, ours = pool
    relay.cut()  # the stock server's node is gone, as far as the gateway can tell
    wait_for(lambda: ready_workers(stub) == 1, 10, "the gateway never noticed the stock server was gone")
    for i in range(3):  # everything goes to our worker now, with no error
        out = run(stub, gpb.ExecuteRequest(task=f"Say {i}", sampling=gpb.SamplingParams(max_tokens=4)))
        assert out[0].started.worker == ours.worker and out[-1].done.usage.completion_tokens <= 4
    relay.start()
    wait_for(lambda: ready_workers(stub) == 2, 30, "the stock server never came back into the pool")
