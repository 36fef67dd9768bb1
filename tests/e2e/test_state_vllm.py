"""The response cache and a server-side session in front of the real vLLM worker (the embedded SmolLM2 model).

A gateway of its own (cache and sessions on, in-process stores: the embedded default, no Redis) in
front of ``vllm_stack``'s worker. Prints the cache-hit vs miss time to first token of the same run
(``pytest -s``)."""

from __future__ import annotations

import json
import statistics

import pytest

from gateway.v1 import gateway_pb2 as gpb
from tests.helpers import build_stack, make_config
from tests.state_helpers import ask, greedy

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def stateful(vllm_stack, tmp_path_factory):
    cfg = make_config(
        "vllm",
        gateway={
            "workers": [{"address": vllm_stack.worker}],
            "cache": {"enabled": True},
            "sessions": {"enabled": True},
        },
    )
    s = build_stack(tmp_path_factory.mktemp("state-vllm"), cfg)
    s.start_gateway()
    yield s
    s.stop()


def test_cache_hit_vs_miss_time_to_first_token(stateful):
    stub = stateful.gateway_stub("gateway")
    prompts = [f"Write a Python function that returns the {n} power of x." for n in ("second", "third", "fourth")]
    prompts += ["Explain what a mutex is in one sentence.", "Name three sorting algorithms."]
    miss_ttft, hit_ttft, miss_client, hit_client = [], [], [], []
    for p in prompts:
        miss = ask(stub, task=p, sampling=greedy(32), timeout=120)
        hit = ask(stub, task=p, sampling=greedy(32), timeout=120)
        assert not miss.done.cache_hit and hit.done.cache_hit
        assert miss.text and hit.text == miss.text and hit.tokens == miss.tokens == miss.done.usage.completion_tokens
        assert hit.started.prompt_tokens == miss.started.prompt_tokens
        miss_ttft.append(miss.done.timings.ttft_ms)
        hit_ttft.append(hit.done.timings.ttft_ms)
        miss_client.append(miss.first_at * 1000)
        hit_client.append(hit.first_at * 1000)
    figures = {
        "requests": len(prompts),
        "miss_ttft_ms_median_gateway": statistics.median(miss_ttft),
        "hit_ttft_ms_median_gateway": statistics.median(hit_ttft),
        "miss_ttft_ms_median_client": round(statistics.median(miss_client), 1),
        "hit_ttft_ms_median_client": round(statistics.median(hit_client), 1),
    }
    print("\nCACHE TTFT", json.dumps(figures))
    assert statistics.median(hit_client) * 5 < statistics.median(miss_client)


def test_a_session_conversation(stateful):
    stub = stateful.gateway_stub("gateway")
    t1 = ask(stub, session_id="ada", task="My name is Ada and I write Go.", sampling=greedy(24), timeout=120)
    t2 = ask(stub, session_id="ada", task="What is my name?", sampling=greedy(16), timeout=120)
    # The model saw turn 1 and its answer again: the real tokenizer counted them.
    assert t2.started.session_history_turns == 1
    assert t2.started.prompt_tokens > t1.started.prompt_tokens + t1.done.usage.completion_tokens
    stored = stub.GetSession(gpb.GetSessionRequest(session_id="ada"), timeout=5)
    assert [t.answer for t in stored.turns] == [t1.text, t2.text]
    print(
        "\nSESSION", json.dumps({"turn1": t1.text, "turn2": t2.text, "turn2_prompt_tokens": t2.started.prompt_tokens})
    )
