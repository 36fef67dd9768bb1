"""The OpenAI-compatible door through Envoy to a real vLLM CPU worker (SmolLM2), with the `openai` package.

What an IDE assistant or SDK does: stream chat completions, ask for whole ones, text completions, list
models; and the pain point of every HTTP gateway: a client that disconnects mid-stream must free the
engine, checked with vLLM's own unfinished-request count.
"""

from __future__ import annotations

import http.client
import json
import socket
import time

import grpc
import openai
import pytest

from gateway.v1 import gateway_pb2 as gpb

pytestmark = pytest.mark.vllm
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def oai(vllm_stack):
    return openai.OpenAI(base_url=f"http://{vllm_stack.envoy}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(vllm_stack):
    from transformers import AutoTokenizer

    from inference import embedded_model

    return AutoTokenizer.from_pretrained(str(embedded_model.model_dir()))


def test_streaming_chat_counts_every_token(oai, tokenizer):
    messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert text.strip() and usage is not None
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["length"], ["stop"])
    if finish == ["length"]:
        assert usage.completion_tokens == 40
    # The same request whole, greedy: the same text.
    whole = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)
    assert whole.choices[0].message.content == text
    assert whole.usage.completion_tokens == usage.completion_tokens


def test_text_completion_and_models(oai):
    assert [m.id for m in oai.models.list()] == [MODEL]
    out = oai.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=12, temperature=0)
    assert out.choices[0].text and out.usage.completion_tokens == 12 and out.choices[0].finish_reason == "length"


def test_unsupported_parameters_are_named(oai):
    messages = [{"role": "user", "content": "hi"}]
    for extra in ({"presence_penalty": 0.7}, {"n": 2}, {"logprobs": True}, {"frequency_penalty": 1.0}):
        with pytest.raises(openai.BadRequestError) as info:
            oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, **extra)
        assert info.value.body["param"] == next(iter(extra))
    # Neutral values of the same parameters are fine.
    ok = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, n=1, presence_penalty=0)
    assert ok.usage.completion_tokens <= 2


def test_fill_in_the_middle_needs_fim_tokens(oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=MODEL, prompt="def f(", suffix="):\n    return 1", max_tokens=4)
    assert info.value.body["param"] == "suffix" and "fill-in-the-middle" in info.value.body["message"]


def test_raw_http_through_envoy(vllm_stack):
    host, port = vllm_stack.envoy.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"content-type": "application/json"})
    resp = conn.getresponse()
    events = [e.removeprefix("data: ") for e in resp.read().decode().split("\n\n") if e]
    assert resp.status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"


def test_disconnect_mid_stream_aborts_in_the_engine(vllm_stack):
    host, port = vllm_stack.envoy.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Count from 1 to 500."}],
            "max_tokens": 1000,
            "temperature": 0,
            "stream": True,
        }
    ).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    got = b""
    while got.count(b"data: ") < 4:
        got += sock.recv(4096)
    assert vllm_stack.worker_load().engine_unfinished_requests == 1  # generating
    sock.close()
    load, waited = vllm_stack.wait_worker_idle(5.0)
    assert load.engine_unfinished_requests == 0 and load.active_requests == 0, load
    assert waited < 1.5, f"the engine still held the request {waited:.2f} s after the client left"


def test_supersession_reaches_the_engine_on_both_doors(vllm_stack, oai):
    stub = vllm_stack.gateway_stub("envoy")
    req = gpb.ExecuteRequest(
        task="Count from 1 to 500.", supersede_key="ide-1", sampling=gpb.SamplingParams(max_tokens=500)
    )
    older = stub.Execute(req, timeout=120)
    for r in older:
        if r.WhichOneof("event") == "delta":
            break
    newer = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        extra_headers={"x-igw-supersede-key": "ide-1"},
    )
    assert newer.usage.completion_tokens <= 4
    with pytest.raises(grpc.RpcError) as info:
        for _ in older:
            pass
    assert info.value.code() == grpc.StatusCode.ABORTED
    load, _ = vllm_stack.wait_worker_idle(5.0)
    assert load.engine_unfinished_requests == 0
    time.sleep(0.1)
