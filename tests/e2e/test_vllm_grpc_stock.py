"""vLLM's own gRPC server (python -m vllm.entrypoints.launchers.grpc_server, servicer from
smg-grpc-servicer) serving the embedded SmolLM2, driven with smg-grpc-proto's generated client as
our gateway drives such a pool member; and SMG, the peer gateway, in front of it.

One vLLM start for the session (the ``stock_vllm_grpc`` fixture, shared with test_vllm_grpc_pool.py).
"""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from smg_grpc_proto import vllm_engine_pb2 as pb
from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc

from bench import peer
from bench.load import summary
from tests.helpers import free_port

pytestmark = pytest.mark.vllm

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def stock(stock_vllm_grpc):
    return stock_vllm_grpc


@pytest.fixture(scope="module")
def stub(stock):
    with grpc.insecure_channel(stock.worker) as ch:
        yield pb_grpc.VllmEngineStub(ch)


@pytest.fixture(scope="module")
def tokenizer(stub):
    from transformers import AutoTokenizer

    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    return AutoTokenizer.from_pretrained(info.tokenizer_path)


@pytest.fixture(scope="module")
def prompt(tokenizer):
    """A chat prompt rendered and tokenized as a gateway does for a vLLM gRPC server."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Count from 1 to 100, one number per line."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return tokenizer.encode(text, add_special_tokens=False)


def request(rid, ids, **sampling):
    sampling.setdefault("temperature", 0.0)
    return pb.GenerateRequest(
        request_id=rid,
        tokenized=pb.TokenizedInput(input_ids=ids),
        sampling_params=pb.SamplingParams(**sampling),
        stream=True,
    )


def running(stub) -> int:
    """Requests in vLLM's scheduler (GetLoads: its latest scheduler stats, refreshed every engine step)."""
    load = stub.GetLoads(pb.GetLoadsRequest(), timeout=5).loads[0]
    return load.num_running_reqs + load.num_waiting_reqs


def wait_running(stub, want: int, timeout_s: float = 10.0) -> float:
    t0 = time.monotonic()
    while (n := running(stub)) != want:
        assert time.monotonic() - t0 < timeout_s, f"vLLM still has {n} requests, expected {want}"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_generate_streams_n_tokens_as_token_ids(stub, tokenizer, prompt):
    n = 16
    responses = list(stub.Generate(request("e2e-n", prompt, max_tokens=n, ignore_eos=True), timeout=120))
    chunks = [r.chunk for r in responses if r.HasField("chunk")]
    assert [r.WhichOneof("response") for r in responses][-1] == "complete"
    done = responses[-1].complete

    ids = [t for c in chunks for t in c.token_ids]
    assert len(ids) == n and all(c.completion_tokens == len(c.token_ids) for c in chunks)
    assert len(chunks) >= n // 2, "streamed step by step, not in one message"
    assert all(c.prompt_tokens == len(prompt) for c in chunks)
    # The closing message repeats the last step's ids (streaming): it adds no output.
    assert done.finish_reason == "length"
    assert list(done.output_ids) == list(chunks[-1].token_ids) and done.completion_tokens == len(chunks[-1].token_ids)
    text = tokenizer.decode(ids)
    assert text.strip() and text.lstrip().startswith("1"), text  # greedy SmolLM2 counts


def test_stop_token_id_finishes_with_matched_token(stub, prompt):
    first = list(stub.Generate(request("e2e-probe", prompt, max_tokens=3), timeout=120))
    ids = [t for r in first if r.HasField("chunk") for t in r.chunk.token_ids]
    responses = list(stub.Generate(request("e2e-stop", prompt, max_tokens=30, stop_token_ids=[ids[1]]), timeout=120))
    done = responses[-1].complete
    out = [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]
    assert out == ids[: ids.index(ids[1]) + 1]  # greedy: the probe's tokens, up to the stop token
    assert (done.finish_reason, done.matched_token_id) == ("stop", ids[1])


def test_abort_reaches_vllm(stub, prompt):
    call = stub.Generate(request("e2e-abort", prompt, max_tokens=1000, ignore_eos=True), timeout=300)
    got = [next(call) for _ in range(3)]
    assert all(r.HasField("chunk") for r in got)
    wait_running(stub, 1)
    t0 = time.monotonic()
    stub.Abort(pb.AbortRequest(request_ids=["e2e-abort"]), timeout=10)
    rest = list(call)
    assert time.monotonic() - t0 < 5
    assert rest[-1].complete.finish_reason == "abort" and list(rest[-1].complete.output_ids) == []
    assert call.code() == grpc.StatusCode.OK
    assert sum(len(r.chunk.token_ids) for r in got + rest if r.HasField("chunk")) < 1000
    wait_running(stub, 0)


def test_client_cancel_reaches_vllm(stub, prompt):
    call = stub.Generate(request("e2e-cancel", prompt, max_tokens=1000, ignore_eos=True), timeout=300)
    next(call), next(call)
    wait_running(stub, 1)
    call.cancel()
    wait_running(stub, 0)


def test_model_and_server_info(stock, stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.served_model_name == MODEL
    assert info.max_context_length == stock.cfg.worker.vllm.max_model_len
    assert info.tokenizer_path and info.model_path == stock.model_folder()
    assert list(info.eos_token_ids) == [2] and info.is_generation
    assert stub.HealthCheck(pb.HealthCheckRequest(), timeout=10).healthy
    with grpc.insecure_channel(stock.worker) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="vllm.grpc.engine.VllmEngine"), timeout=10
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    loads = stub.GetLoads(pb.GetLoadsRequest(), timeout=10)
    assert loads.dp_rank_count == 1 and loads.loads[0].max_total_num_tokens > 0


async def test_smg_streams_openai_chat_from_stock_vllm(stock, stub):
    from openai import AsyncOpenAI

    smg = f"127.0.0.1:{free_port()}"
    stock.start_smg("smg", smg, [stock.worker], free_port())  # stopped first by the module's stop()
    client = AsyncOpenAI(base_url=f"http://{smg}/v1", api_key="unused")
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from 1 to 100, one number per line."}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    content, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            if chunk.choices[0].delta.content:
                content.append(chunk.choices[0].delta.content)
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(content).lstrip().startswith("1")
    assert finish == "length" and usage.completion_tokens == 12 and len(content) == 12

    run = await peer.openai_chat(
        f"http://{smg}", MODEL, concurrency=2, requests=4, max_tokens=8, extra={"ignore_eos": True}
    )
    s = summary(run)
    assert (s["errors"], s["tokens"]) == (0, 32), s
    wait_running(stub, 0)
