"""The synthetic engine behind vLLM's gRPC contract (igw_stack.vllm_grpc_standin), driven with the
generated client of smg-grpc-proto as a gateway drives a stock vLLM gRPC server; and SMG, the peer
gateway, streaming OpenAI chat completions in front of it (what ``make bench`` measures).

The server is a real process on loopback (started by ``Processes.start_vllm_grpc``); its token ids
are the embedded model's, so they decode with that tokenizer.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import statistics
import threading
import time
import zipfile

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from smg_grpc_proto import vllm_engine_pb2 as pb
from smg_grpc_proto import vllm_engine_pb2_grpc as pb_grpc
from smg_grpc_proto.generated import common_pb2

from bench import peer
from bench.load import summary
from tests.helpers import build_stack, free_port, make_config

RATE = 20.0  # tokens/s per request: an engine step every 50 ms
STEP_S = 1 / RATE
CONTEXT = 256
TEXT = "lorem ipsum dolor sit amet "  # worker.synthetic.text's default
MODEL = "smollm2-135m-instruct"
PROMPT = [504, 3575, 282, 4649, 314]  # "The capital of France is"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = make_config("synthetic", worker={"synthetic": {"tokens_per_s": RATE, "max_context_tokens": CONTEXT}})
    s = build_stack(tmp_path_factory.mktemp("vllm-grpc-synthetic"), cfg)
    try:
        s.start_vllm_grpc(timeout_s=300)  # the first start on a machine converts the embedded model (~25 s)
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.worker) as ch:
        yield pb_grpc.VllmEngineStub(ch)


@pytest.fixture(scope="module")
def tokenizer(stub):
    from tokenizers import Tokenizer

    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    return Tokenizer.from_file(f"{info.tokenizer_path}/tokenizer.json")


@pytest.fixture(scope="module")
def cycle(tokenizer):
    return tokenizer.encode(TEXT, add_special_tokens=False).ids


def generate(stub, rid="r", ids=PROMPT, stream=True, **sampling):
    req = pb.GenerateRequest(
        request_id=rid,
        tokenized=pb.TokenizedInput(input_ids=ids),
        sampling_params=pb.SamplingParams(**sampling),
        stream=stream,
    )
    return [(time.monotonic(), r) for r in stub.Generate(req, timeout=30)]


def split(responses):
    """(chunks, complete) of one Generate stream; the complete must be the last message."""
    chunks = [r.chunk for _, r in responses if r.HasField("chunk")]
    completes = [r.complete for _, r in responses if r.HasField("complete")]
    assert len(completes) == 1 and responses[-1][1].HasField("complete")
    return chunks, completes[0]


def running(stub) -> int:
    return stub.GetLoads(pb.GetLoadsRequest(), timeout=5).loads[0].num_running_reqs


def wait_running(stub, want: int, timeout_s: float = 3.0) -> float:
    """Seconds until GetLoads reports ``want`` requests in the engine (AssertionError after timeout_s)."""
    t0 = time.monotonic()
    while (n := running(stub)) != want:
        assert time.monotonic() - t0 < timeout_s, f"engine still runs {n} requests, expected {want}"
        time.sleep(0.01)
    return time.monotonic() - t0


def test_stream_of_n_tokens_one_chunk_per_step_then_complete(stub, tokenizer, cycle):
    n = 17
    responses = generate(stub, max_tokens=n)
    chunks, done = split(responses)

    assert len(chunks) == n
    assert all(list(c.token_ids) and len(c.token_ids) == 1 and c.completion_tokens == 1 for c in chunks)
    assert all(c.prompt_tokens == len(PROMPT) for c in chunks)
    ids = [t for c in chunks for t in c.token_ids]
    assert ids == [cycle[i % len(cycle)] for i in range(n)]
    assert tokenizer.decode(ids) == (TEXT * 2)[: len(tokenizer.decode(ids))]
    assert tokenizer.decode(ids).startswith("lorem ipsum dolor sit amet lorem")
    # The closing message repeats the last step's ids, as the stock servicer does: it is no more output.
    assert done.finish_reason == "length"
    assert list(done.output_ids) == list(chunks[-1].token_ids) and done.completion_tokens == 1
    assert done.prompt_tokens == len(PROMPT)
    # Paced by the engine's steps, not sent in one burst.
    times = [t for t, r in responses if r.HasField("chunk")]
    assert times[-1] - times[0] >= (n - 1) * STEP_S * 0.8


def test_not_streamed_answers_one_complete_with_every_token(stub, cycle):
    responses = generate(stub, stream=False, max_tokens=9)
    assert len(responses) == 1
    done = responses[0][1].complete
    assert list(done.output_ids) == cycle[:9]
    assert (done.finish_reason, done.completion_tokens, done.prompt_tokens) == ("length", 9, len(PROMPT))


def test_text_prompt_is_tokenized_by_the_server(stub, tokenizer):
    text = "The capital of France is"
    req = pb.GenerateRequest(request_id="t", text=text, sampling_params=pb.SamplingParams(max_tokens=2), stream=True)
    chunks, done = split([(0, r) for r in stub.Generate(req, timeout=30)])
    assert len(chunks) == 2
    assert done.prompt_tokens == len(tokenizer.encode(text).ids) == len(PROMPT)


def test_stop_token_ids_and_stop_strings_finish_as_vllm_reports_them(stub, tokenizer, cycle):
    # A stop token is part of the output and named in matched_token_id.
    stop_id = cycle[1]
    assert cycle.count(stop_id) == 1
    chunks, done = split(generate(stub, max_tokens=40, stop_token_ids=[stop_id]))
    assert [c.token_ids[0] for c in chunks] == cycle[:2]
    assert (done.finish_reason, done.matched_token_id) == ("stop", stop_id)
    assert done.WhichOneof("matched_stop") == "matched_token_id"

    # min_tokens holds it back to its next occurrence.
    chunks, done = split(generate(stub, max_tokens=40, min_tokens=5, stop_token_ids=[stop_id]))
    assert len(chunks) == len(cycle) + 2 and done.finish_reason == "stop"

    # A stop string: the token that completes it is the last one sent; the caller trims the text.
    chunks, done = split(generate(stub, max_tokens=40, stop=["dolor"]))
    text = tokenizer.decode([c.token_ids[0] for c in chunks])
    assert text == "lorem ipsum dolor"
    assert (done.finish_reason, done.matched_stop_str) == ("stop", "dolor")

    # A stop string spanning two cycles is found too.
    chunks, done = split(generate(stub, max_tokens=40, stop=["amet lorem"]))
    assert tokenizer.decode([c.token_ids[0] for c in chunks]) == "lorem ipsum dolor sit amet lorem"
    assert done.matched_stop_str == "amet lorem"


def test_context_window_caps_max_tokens(stub):
    prompt = [100] * (CONTEXT - 6)
    chunks, done = split(generate(stub, ids=prompt, max_tokens=50))
    assert len(chunks) == 6 and done.finish_reason == "length"
    chunks, done = split(generate(stub, ids=prompt))  # max_tokens unset: up to the window
    assert len(chunks) == 6 and done.finish_reason == "length"


def test_invalid_requests_fail_with_invalid_argument_and_others_go_on(stub):
    result = {}
    other = threading.Thread(target=lambda: result.update(r=generate(stub, rid="other", max_tokens=30)))
    other.start()
    cases = {
        "max_tokens must be at least 1": dict(max_tokens=0),
        "prompt cannot be empty": dict(ids=[]),
        "Token id 999999 is out of vocabulary": dict(ids=[1, 999999]),
        f"(length {CONTEXT}) plus the number of requested output tokens": dict(ids=[5] * CONTEXT),
        f"longer than the maximum model length of {CONTEXT}": dict(ids=[5] * (CONTEXT + 1)),
        "n > 1 is not supported": dict(n=2),
        "no logprobs": dict(logprobs=1),
        "stop cannot contain an empty string": dict(stop=[""]),
    }
    for message, kwargs in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            generate(stub, rid="bad", **kwargs)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in err.value.details()
    other.join(10)
    chunks, done = split(result["r"])
    assert len(chunks) == 30 and done.finish_reason == "length"


async def test_abort_ends_the_stream_at_once_and_leaves_the_engine(server, stub):
    async with grpc.aio.insecure_channel(server.worker) as ch:
        astub = pb_grpc.VllmEngineStub(ch)

        def start(rid, n):
            req = pb.GenerateRequest(
                request_id=rid,
                tokenized=pb.TokenizedInput(input_ids=PROMPT),
                sampling_params=pb.SamplingParams(max_tokens=n),
                stream=True,
            )
            return astub.Generate(req, timeout=60)

        victim, bystander = start("victim", 1000), start("bystander", 40)
        got = []
        async for r in victim:
            got.append(r)
            if len(got) == 3:
                break
        assert running(stub) == 2
        t0 = time.monotonic()
        await astub.Abort(pb.AbortRequest(request_ids=["victim", "never-was"]), timeout=5)
        rest = [r async for r in victim]
        ended_after = time.monotonic() - t0
        # vLLM ends an aborted stream with an empty "abort" completion and status OK.
        assert [r.WhichOneof("response") for r in rest][-1] == "complete"
        assert rest[-1].complete.finish_reason == "abort" and list(rest[-1].complete.output_ids) == []
        assert await victim.code() == grpc.StatusCode.OK
        assert ended_after < STEP_S, f"the aborted stream ended {ended_after * 1000:.0f} ms after Abort"
        assert wait_running(stub, 1) < 1.0  # the bystander is still in the engine
        chunks = [r.chunk async for r in bystander if r.HasField("chunk")]
        assert len(chunks) == 40
        wait_running(stub, 0)


async def test_abort_reaches_every_request_sharing_the_id(server, stub):
    async with grpc.aio.insecure_channel(server.worker) as ch:
        astub = pb_grpc.VllmEngineStub(ch)
        req = pb.GenerateRequest(
            request_id="twin",
            tokenized=pb.TokenizedInput(input_ids=PROMPT),
            sampling_params=pb.SamplingParams(max_tokens=1000),
            stream=True,
        )
        calls = [astub.Generate(req, timeout=60) for _ in range(2)]
        for call in calls:
            await call.read()
        await astub.Abort(pb.AbortRequest(request_ids=["twin"]), timeout=5)
        for call in calls:
            last = None
            while (r := await call.read()) is not grpc.aio.EOF:
                last = r
            assert last.complete.finish_reason == "abort"
    wait_running(stub, 0)


def test_client_cancel_leaves_the_engine(stub):
    req = pb.GenerateRequest(
        request_id="leaver",
        tokenized=pb.TokenizedInput(input_ids=PROMPT),
        sampling_params=pb.SamplingParams(max_tokens=1000),
        stream=True,
    )
    call = stub.Generate(req, timeout=60)
    next(call), next(call)
    assert running(stub) == 1
    call.cancel()
    assert wait_running(stub, 0) < 1.0


async def test_concurrent_streams_share_engine_steps(server, stub):
    """Steps are the engine's, not each request's: a stream that starts later gets its tokens on the
    same ticks as one already running, and all of them advance together."""
    n, streams = 12, 16
    arrivals: dict[int, list[float]] = {}

    async with grpc.aio.insecure_channel(server.worker) as ch:
        astub = pb_grpc.VllmEngineStub(ch)

        async def one(i):
            req = pb.GenerateRequest(
                request_id=f"c{i}",
                tokenized=pb.TokenizedInput(input_ids=PROMPT),
                sampling_params=pb.SamplingParams(max_tokens=n),
                stream=True,
            )
            async for r in astub.Generate(req, timeout=60):
                if r.HasField("chunk"):
                    arrivals.setdefault(i, []).append(time.monotonic())

        first = asyncio.create_task(one(0))
        while len(arrivals.get(0, ())) < 2:
            await asyncio.sleep(0.005)
        await asyncio.sleep(STEP_S / 2)  # half a step out of phase with the first stream's ticks
        t0 = time.monotonic()
        late = [asyncio.create_task(one(i)) for i in range(1, streams)]
        await asyncio.sleep(3 * STEP_S)
        in_engine = running(stub)
        await asyncio.gather(first, *late)
        elapsed = time.monotonic() - t0

    assert in_engine == streams
    assert all(len(a) == n for a in arrivals.values())
    # Sharing steps, the late streams' tokens arrive on the first stream's ticks (their own timers
    # would put them half a step off).
    ticks = arrivals[0]
    offsets = [min(abs(t - k) for k in ticks) for i in range(1, streams) for t in arrivals[i] if t <= ticks[-1]]
    assert statistics.median(offsets) < STEP_S / 5, f"median offset {statistics.median(offsets) * 1000:.1f} ms"
    # And all of them advance at the engine's rate, together.
    assert elapsed < (n + 3) * STEP_S * 1.5


def test_model_and_server_info_health_and_tokenizer(server, stub, tokenizer, cycle):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert info.served_model_name == MODEL
    assert info.max_context_length == info.max_req_input_len == CONTEXT
    assert info.is_generation and info.vocab_size == tokenizer.get_vocab_size()
    assert info.model_path == info.tokenizer_path and list(info.eos_token_ids) == [2]

    server_info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
    assert server_info.max_num_seqs == server.cfg.worker.max_concurrent_requests
    assert server_info.active_requests == 0  # never set by the stock servicer either: use GetLoads

    loads = stub.GetLoads(pb.GetLoadsRequest(), timeout=5)
    assert loads.dp_rank_count == 1 and loads.loads[0].num_running_reqs == 0

    assert stub.HealthCheck(pb.HealthCheckRequest(), timeout=5).healthy
    with grpc.insecure_channel(server.worker) as ch:
        check = health_pb2_grpc.HealthStub(ch).Check
        for service in ("", "vllm.grpc.engine.VllmEngine"):
            status = check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING

    # GetTokenizer: a ZIP of the tokenizer files, SHA-256 on the last chunk only; it decodes our ids.
    chunks = list(stub.GetTokenizer(common_pb2.GetTokenizerRequest(), timeout=30))
    data = b"".join(c.data for c in chunks)
    assert [bool(c.sha256) for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    bundle = zipfile.ZipFile(io.BytesIO(data))
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(bundle.namelist())
    from tokenizers import Tokenizer

    assert Tokenizer.from_str(bundle.read("tokenizer.json").decode()).decode(cycle) == TEXT


async def test_smg_streams_openai_chat_over_the_synthetic_server(server, stub, tokenizer, cycle):
    """SMG registers the synthetic server as a vLLM gRPC worker and serves it as OpenAI chat: one SSE
    chunk per token, the text the token ids decode to; bench.peer measures it."""
    from openai import AsyncOpenAI

    smg = f"127.0.0.1:{free_port()}"
    server.start_smg("smg", smg, [server.worker], free_port())  # stopped first by the module's stop()
    client = AsyncOpenAI(base_url=f"http://{smg}/v1", api_key="unused")
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=14,
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
    assert len(content) == 14, content  # one chunk per token
    assert "".join(content) == tokenizer.decode((cycle * 2)[:14]) == "lorem ipsum dolor sit amet lore"
    assert finish == "length" and usage.completion_tokens == 14

    # The peer's load generator: every record complete, counting every token, either way of counting.
    for usage_mode in ("final", "continuous"):
        run = await peer.openai_chat(f"http://{smg}", MODEL, concurrency=4, requests=8, max_tokens=10, usage=usage_mode)
        s = summary(run)
        assert (s["requests"], s["errors"], s["tokens"]) == (8, 0, 80), s
        assert all(len(r.arrivals) == 10 and r.ttft > 0 for r in run.records)
    wait_running(stub, 0)
