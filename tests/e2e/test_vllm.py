"""End to end through Envoy and the gateway to a real vLLM CPU worker (SmolLM2)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from tests.helpers import wait_ready_workers

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def tokenizer(vllm_stack):
    from transformers import AutoTokenizer

    from inference import embedded_model

    return AutoTokenizer.from_pretrained(str(embedded_model.model_dir()))


def collect(stub, req, timeout=120):
    """Run one Execute; return (events with arrival times, text, done)."""
    events, text, done = [], [], None
    for resp in stub.Execute(req, timeout=timeout):
        kind = resp.WhichOneof("event")
        events.append((time.monotonic(), kind, resp))
        if kind == "delta":
            text.append(resp.delta.text)
        elif kind == "done":
            done = resp.done
    return events, "".join(text), done


def test_streams_deltas_then_done_through_envoy(vllm_stack, tokenizer):
    stub = vllm_stack.gateway_stub("envoy")
    req = gpb.ExecuteRequest(
        task="Write a Python function that adds two numbers.",
        request_id="e2e-1",
        sampling=gpb.SamplingParams(max_tokens=48, temperature=0),
    )
    events, text, done = collect(stub, req)

    kinds = [k for _, k, _ in events]
    assert kinds[0] == "started" and kinds[-1] == "done"
    started = events[0][2].started
    assert started.request_id == "e2e-1"
    assert started.model == "smollm2-135m-instruct"
    assert started.worker == vllm_stack.worker
    deltas = [r.delta for _, k, r in events if k == "delta"]
    assert len(deltas) >= 5, f"expected a stream of deltas, got {len(deltas)}"
    assert text.strip(), "no text generated"

    # Usage matches what was received.
    assert done.usage.completion_tokens == sum(d.tokens for d in deltas)
    assert 0 < done.usage.completion_tokens <= 48
    assert done.usage.prompt_tokens == started.prompt_tokens > 0
    retokenized = len(tokenizer.encode(text, add_special_tokens=False))
    # Re-tokenizing decoded text can merge or split a few tokens; the EOS token has no text.
    assert abs(retokenized - done.usage.completion_tokens) <= max(3, done.usage.completion_tokens // 10)
    if done.finish_reason == gpb.FINISH_REASON_LENGTH:
        assert done.usage.completion_tokens == 48

    # Streamed, not buffered: the first delta arrives well before the last one.
    t_first = next(t for t, k, _ in events if k == "delta")
    t_last = [t for t, k, _ in events if k == "delta"][-1]
    t_start = events[0][0]
    assert t_last - t_first > 0.5 * (t_last - t_start), "deltas arrived in one burst at the end"
    assert done.timings.ttft_ms <= done.timings.total_ms
    assert done.timings.total_ms > 0


def test_stream_interval_merges_vllm_steps_at_the_worker(vllm_stack):
    """Temperature 0, the same request asking for every step and for a delta per 250 ms: the same text and
    token count, the first token alone and at once, and only about one delta per 250 ms."""
    stub = vllm_stack.gateway_stub("envoy")
    runs = {}
    for interval_ms in (0, 250):
        req = gpb.ExecuteRequest(
            task="Write a Python function that reverses a string.",
            sampling=gpb.SamplingParams(max_tokens=48, temperature=0),
        )
        req.stream_interval_ms = interval_ms
        events, text, done = collect(stub, req)
        runs[interval_ms] = ([r.delta.tokens for _, k, r in events if k == "delta"], text, done)
    every, every_text, every_done = runs[0]
    paced, paced_text, paced_done = runs[250]
    assert paced_text == every_text and paced_done.usage.completion_tokens == every_done.usage.completion_tokens
    assert sum(paced) == paced_done.usage.completion_tokens
    assert paced[0] <= 3  # not held for the interval (a loaded machine may merge a step before the frame goes)
    generating_s = (paced_done.timings.total_ms - paced_done.timings.ttft_ms) / 1000
    assert len(paced) <= generating_s / 0.25 + 3 and len(paced) < len(every)


def test_chat_messages_use_the_model_chat_template(vllm_stack, tokenizer):
    stub = vllm_stack.gateway_stub("envoy")
    messages = [
        {"role": "system", "content": "You are a terse coding assistant."},
        {"role": "user", "content": "What does len() do in Python?"},
        {"role": "assistant", "content": "It returns the number of items."},
    ]
    req = gpb.ExecuteRequest(
        task="And what does sorted() do?",
        messages=[gpb.ChatMessage(**m) for m in messages],
        sampling=gpb.SamplingParams(max_tokens=8, temperature=0),
    )
    events, _, done = collect(stub, req)
    full = messages + [{"role": "user", "content": "And what does sorted() do?"}]
    rendered = tokenizer.apply_chat_template(full, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in rendered  # SmolLM2's ChatML template
    expected = len(tokenizer.encode(rendered, add_special_tokens=False))
    assert events[0][2].started.prompt_tokens == expected
    assert done.usage.prompt_tokens == expected
    # Without the template the same words are far fewer tokens.
    plain = sum(len(tokenizer.encode(m["content"], add_special_tokens=False)) for m in full)
    assert expected > plain + 4 * len(full)


def test_context_struct_reaches_the_prompt(vllm_stack, tokenizer):
    stub = vllm_stack.gateway_stub("gateway")
    base = gpb.ExecuteRequest(task="Explain this code.", sampling=gpb.SamplingParams(max_tokens=1))
    with_ctx = gpb.ExecuteRequest()
    with_ctx.CopyFrom(base)
    ctx = struct_pb2.Struct()
    ctx.update({"file": "main.go", "language": "go", "selection": "fmt.Println(x)"})
    with_ctx.context.CopyFrom(ctx)
    _, _, d0 = collect(stub, base)
    _, _, d1 = collect(stub, with_ctx)
    assert d1.usage.prompt_tokens > d0.usage.prompt_tokens + 10


def _stream_until_first_delta(stub, req, timeout=None):
    call = stub.Execute(req, timeout=timeout)
    for resp in call:
        if resp.WhichOneof("event") == "delta":
            return call
    raise AssertionError("no delta arrived")


def test_cancel_after_first_delta_aborts_in_engine(vllm_stack):
    stub = vllm_stack.gateway_stub("envoy")
    before = vllm_stack.worker_load()
    req = gpb.ExecuteRequest(
        task="Count from 1 to 500, one number per line.", sampling=gpb.SamplingParams(max_tokens=1000, temperature=0)
    )
    call = _stream_until_first_delta(stub, req)
    assert vllm_stack.worker_load().engine_unfinished_requests == 1
    call.cancel()
    load, waited = vllm_stack.wait_worker_idle(timeout_s=1.0)
    assert load.engine_unfinished_requests == 0 and load.active_requests == 0, (
        f"engine still generating {waited:.2f} s after cancel"
    )
    assert load.requests_aborted_total == before.requests_aborted_total + 1
    # Generation really stopped: no more tokens are produced after the abort.
    tokens_then = load.completion_tokens_total
    time.sleep(0.5)
    assert vllm_stack.worker_load().completion_tokens_total == tokens_then
    assert tokens_then - before.completion_tokens_total < 1000


def test_deadline_shorter_than_generation(vllm_stack):
    stub = vllm_stack.gateway_stub("envoy")
    before = vllm_stack.worker_load()
    req = gpb.ExecuteRequest(
        task="Count from 1 to 500, one number per line.", sampling=gpb.SamplingParams(max_tokens=1000, temperature=0)
    )
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        collect(stub, req, timeout=1.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 5
    load, waited = vllm_stack.wait_worker_idle(timeout_s=1.5)
    assert load.engine_unfinished_requests == 0, f"engine still generating {waited:.2f} s after the deadline"
    assert load.requests_aborted_total == before.requests_aborted_total + 1


def _status_details(err: grpc.RpcError):
    status = rpc_status.from_call(err)
    out = []
    for d in status.details if status else []:
        for cls in (error_details_pb2.BadRequest, error_details_pb2.ResourceInfo):
            if d.Is(cls.DESCRIPTOR):
                msg = cls()
                d.Unpack(msg)
                out.append(msg)
    return out


@pytest.mark.parametrize(
    "req, code, field",
    [
        (gpb.ExecuteRequest(task=""), grpc.StatusCode.INVALID_ARGUMENT, "task"),
        (gpb.ExecuteRequest(task="   "), grpc.StatusCode.INVALID_ARGUMENT, "task"),
        (
            gpb.ExecuteRequest(task="hi", sampling=gpb.SamplingParams(max_tokens=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.max_tokens",
        ),
        (
            gpb.ExecuteRequest(task="hi", sampling=gpb.SamplingParams(max_tokens=-5)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.max_tokens",
        ),
        # Within the gateway's limit (4096) but over the model's 2048-token context.
        (
            gpb.ExecuteRequest(task="hi", sampling=gpb.SamplingParams(max_tokens=3000)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.max_tokens",
        ),
        # Fits alone, but not with the prompt: only the worker (which tokenizes) can tell.
        (
            gpb.ExecuteRequest(task="hi", sampling=gpb.SamplingParams(max_tokens=2040)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.max_tokens",
        ),
        (gpb.ExecuteRequest(task="hi", model="gpt-17"), grpc.StatusCode.NOT_FOUND, "model"),
        (
            gpb.ExecuteRequest(task="hi", messages=[gpb.ChatMessage(role="robot", content="x")]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages[0].role",
        ),
        (
            gpb.ExecuteRequest(task="hi", sampling=gpb.SamplingParams(temperature=7)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sampling.temperature",
        ),
        (
            gpb.ExecuteRequest(task="hi", request_id="bad id with spaces"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "request_id",
        ),
    ],
    ids=[
        "empty-task",
        "blank-task",
        "max-tokens-0",
        "max-tokens-negative",
        "max-tokens-over-context",
        "prompt-plus-max-tokens-over-context",
        "unknown-model",
        "bad-role",
        "temperature",
        "request-id",
    ],
)
def test_invalid_requests_name_the_field(vllm_stack, req, code, field):
    stub = vllm_stack.gateway_stub("envoy")
    with pytest.raises(grpc.RpcError) as info:
        collect(stub, req, timeout=30)
    err = info.value
    assert err.code() == code, err.details()
    assert err.details().startswith(field + ":"), err.details()
    details = _status_details(err)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert details and details[0].field_violations[0].field == field
    else:
        assert details and details[0].resource_name == "gpt-17"
        assert "smollm2-135m-instruct" in err.details()


def test_oversize_context_is_rejected(vllm_stack):
    stub = vllm_stack.gateway_stub("envoy")
    ctx = struct_pb2.Struct()
    ctx.update({"file": "big.py", "content": "x" * 70_000})  # default limit: 65,536 bytes
    with pytest.raises(grpc.RpcError) as info:
        collect(stub, gpb.ExecuteRequest(task="summarize", context=ctx), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("context:")


def test_eight_concurrent_streams_share_batched_frames(vllm_stack):
    stub = vllm_stack.gateway_stub("envoy")
    before = vllm_stack.worker_load()
    tasks = [f"Write a haiku about the number {i}." for i in range(8)]
    barrier = threading.Barrier(8)

    def one(i):
        barrier.wait()
        req = gpb.ExecuteRequest(
            task=tasks[i], request_id=f"conc-{i}", sampling=gpb.SamplingParams(max_tokens=32, temperature=0)
        )
        return collect(stub, req)

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, range(8)))
    after = vllm_stack.worker_load()

    delivered = 0
    for i, (events, text, done) in enumerate(results):
        assert events[0][2].started.request_id == f"conc-{i}"
        assert done is not None and text
        deltas = sum(r.delta.tokens for _, k, r in events if k == "delta")
        assert deltas == done.usage.completion_tokens
        delivered += deltas
    frames = after.frames_sent_total - before.frames_sent_total
    assert after.completion_tokens_total - before.completion_tokens_total == delivered
    # One frame per engine step for all requests, not one per token per request.
    assert frames < delivered / 2, f"{frames} frames for {delivered} tokens"
    # Independent: same prompt with temperature 0 gives the same text alone as in the batch.
    _, alone, _ = collect(
        stub, gpb.ExecuteRequest(task=tasks[3], sampling=gpb.SamplingParams(max_tokens=32, temperature=0))
    )
    assert alone == results[3][1]


def test_list_models(vllm_stack):
    stub = vllm_stack.gateway_stub("envoy")
    resp = stub.ListModels(gpb.ListModelsRequest(), timeout=10)
    assert [(m.name, m.max_context_tokens, m.ready_workers, m.is_default) for m in resp.models] == [
        ("smollm2-135m-instruct", 2048, 1, True)
    ]


def test_queueing_in_front_of_vllm(vllm_stack, tmp_path):
    """A second gateway on the same vLLM worker, allowed one request in flight: the next waits
    in the gateway; an interactive request overtakes a queued batch one; a deadline that passes
    in the queue never reaches vLLM."""
    import yaml

    from igw_stack.launcher import free_port

    cfg = yaml.safe_load(vllm_stack.config_path.read_text())
    cfg["gateway"]["listen"] = f"127.0.0.1:{free_port()}"
    cfg["gateway"]["queue"] = {"max_in_flight_per_worker": 1}
    cfg["gateway"]["metrics_listen"] = ""
    cfg["gateway"]["http_listen"] = ""  # the first gateway holds its HTTP port
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from igw_stack import launcher as stack

    gateway = stack.Processes(path, log_dir=tmp_path)
    try:
        gateway.start_gateway()
        stub = gpb_grpc.GatewayStub(grpc.insecure_channel(cfg["gateway"]["listen"]))
        wait_ready_workers(stub, 1, timeout=30)
        # Long enough to hold the one slot for the whole test even when vLLM decodes fast (a CI
        # run once saw 200 tokens finish before the queued pair arrived); it is cancelled below.
        long = gpb.ExecuteRequest(
            task="Count from 1 to 1000.", sampling=gpb.SamplingParams(max_tokens=1500, temperature=0)
        )
        blocker = stub.Execute(long, timeout=120)
        next(iter(blocker))
        before = vllm_stack.worker_load()
        with pytest.raises(grpc.RpcError) as info:
            collect(stub, gpb.ExecuteRequest(task="hi", sampling=gpb.SamplingParams(max_tokens=4)), timeout=1.0)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert vllm_stack.worker_load().requests_total == before.requests_total  # vLLM never saw it

        order, lock = [], threading.Lock()

        def one(name, prio):
            sent = time.monotonic()
            events, _, done = collect(
                stub,
                gpb.ExecuteRequest(
                    task=f"Say {name}.", priority=prio, sampling=gpb.SamplingParams(max_tokens=4, temperature=0)
                ),
            )
            # Order by when the gateway dispatched each (sent + its queue wait), not by when this
            # thread got its end: a CI run once saw the batch answer's thread return first, 170 ms
            # after the interactive one was dispatched, on cores vLLM was busy on.
            with lock:
                order.append((name, sent + done.timings.queue_ms / 1000, done.timings.queue_ms))

        with ThreadPoolExecutor(2) as ex:
            b = ex.submit(one, "batch", gpb.PRIORITY_BATCH)
            time.sleep(0.3)
            i = ex.submit(one, "interactive", gpb.PRIORITY_INTERACTIVE)
            time.sleep(0.3)
            assert blocker.running(), "the blocker ended by itself; the queue test's premise failed"
            blocker.cancel()
            b.result(), i.result()
        assert [n for n, _, _ in sorted(order, key=lambda o: o[1])] == ["interactive", "batch"], order
        assert all(q > 0 for _, _, q in order)  # both really waited in the gateway's queue
    finally:
        gateway.stop()


def test_the_native_relay_serves_vllm_as_the_gateway_does(vllm_stack, tmp_path):
    """gateway.native_relay on, a second gateway on the same vLLM worker: a greedy answer through its relay
    is the first gateway's, token for token, with the same usage; a cancel through the relay stops vLLM."""
    import yaml

    from igw_stack import launcher as stack
    from igw_stack.launcher import free_port

    cfg = yaml.safe_load(vllm_stack.config_path.read_text())
    relay = f"127.0.0.1:{free_port()}"
    cfg["gateway"].update(listen=f"127.0.0.1:{free_port()}", metrics_listen="", http_listen="")
    cfg["gateway"]["native_relay"] = {"enabled": True, "listen": relay}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    gateway = stack.Processes(path, log_dir=tmp_path)
    try:
        gateway.start_gateway()
        wait_ready_workers(gpb_grpc.GatewayStub(grpc.insecure_channel(cfg["gateway"]["listen"])), 1, timeout=30)
        req = gpb.ExecuteRequest(
            task="Write a Python function that reverses a string.",
            sampling=gpb.SamplingParams(max_tokens=40, temperature=0),
        )
        through_relay = collect(gpb_grpc.GatewayStub(grpc.insecure_channel(relay)), req)
        through_gateway = collect(vllm_stack.gateway_stub("envoy"), req)
        assert through_relay[1] == through_gateway[1] and through_relay[1].strip()
        assert through_relay[2].usage == through_gateway[2].usage
        assert [k for _, k, _ in through_relay[0]][0] == "started"

        long = gpb.ExecuteRequest(task="Count from 1 to 1000.", sampling=gpb.SamplingParams(max_tokens=1000))
        call = gpb_grpc.GatewayStub(grpc.insecure_channel(relay)).Execute(long, timeout=120)
        for r in call:
            if r.HasField("delta"):
                call.cancel()
                break
        load, _ = vllm_stack.wait_worker_idle(10)
        assert load.engine_unfinished_requests == 0
    finally:
        gateway.stop()
