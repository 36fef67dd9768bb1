"""`vllm serve` (vLLM's OpenAI-compatible HTTP server, CPU build, embedded model) as an ``openai-http`` pool
member, through Envoy and the gateway, with the real ``openai`` package: streamed text and exact usage
against the same request sent straight to vLLM, a forced tool call, a cancel that vLLM itself sees (its own
running count goes to 0), and a second `vllm serve` standing in for a cloud overflow pool that takes
requests only when the first is full, and only for tenants allowed to burst."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import openai
import pytest

from tests.helpers import build_stack, free_port, igw_keys, make_config

MODEL = "smollm2-135m-instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def vllm_running(addr: str) -> float:
    """vLLM's own count of requests running or waiting, from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        text = r.read().decode()
    names = ("vllm:num_requests_running", "vllm:num_requests_waiting")
    return sum(s.value for f in text_string_to_metric_families(text) if f.name in names for s in f.samples)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Two `vllm serve`: "onprem" (one request at a time) and "cloud" (an overflow pool with a bearer token,
    after 1 s in the queue). Tenant "private" is on-prem only."""
    tmp = tmp_path_factory.mktemp("openai-http-vllm")
    keys, token = tmp / "keys.yaml", tmp / "cloud-token"
    token.write_text("cloud-key-for-the-test\n")
    onprem, cloud = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    cfg = make_config(
        "vllm",
        gateway={
            "auth": {"mode": "api_key", "key_file": str(keys)},
            "overflow": {"after_queue_ms": 1000, "on_prem_only_tenants": ["private"]},
        },
    )
    cfg["gateway"]["pools"] = [
        {
            "name": "onprem",
            "workers": [{"protocol": "openai-http", "address": f"http://{onprem}/v1", "max_concurrent_requests": 1}],
        },
        {
            "name": "cloud",
            "overflow": True,
            "workers": [{"protocol": "openai-http", "address": f"http://{cloud}/v1", "api_key_file": str(token)}],
        },
    ]
    del cfg["gateway"]["workers"]
    keys_of = {t: igw_keys("issue", "--file", str(keys), "--tenant", t) for t in ("burst", "private")}
    s = build_stack(tmp, cfg)
    try:
        s.start_vllm_http("vllm-onprem", onprem)
        s.start_vllm_http("vllm-cloud", cloud, extra_args=["--api-key", "cloud-key-for-the-test"])
        s.start_gateway()
        s.start_envoy()
        yield s, onprem, cloud, keys_of
    finally:
        s.stop()


def client(base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)


def stream_chat(oai: openai.OpenAI, messages, **kw):
    text, usage, finish = "", None, None
    for c in oai.chat.completions.create(
        model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}, **kw
    ):
        if c.usage is not None:
            usage = c.usage
        for choice in c.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, usage, finish


def wait_ready(oai: openai.OpenAI) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            oai.models.list()
            return
        except openai.APIError:
            assert time.monotonic() < deadline, "the gateway never reached its vllm serve members"
            time.sleep(0.5)


def test_text_usage_tools_and_cancel_through_the_gateway(fleet):
    s, onprem, cloud, keys = fleet
    gw = client(f"http://{s.envoy}/v1", keys["private"])
    wait_ready(gw)
    messages = [{"role": "user", "content": "Name three colors."}]
    straight = stream_chat(client(f"http://{onprem}/v1", "unused"), messages, max_tokens=16, temperature=0)
    through = stream_chat(gw, messages, max_tokens=16, temperature=0)
    assert through[0] == straight[0] and through[0]
    assert (through[1].prompt_tokens, through[1].completion_tokens) == (
        straight[1].prompt_tokens,
        straight[1].completion_tokens,
    )
    assert through[2] == straight[2]

    # A forced call: vLLM's server decodes it under its structured outputs and streams OpenAI's tool_calls;
    # the gateway passes the tools through and relays the pieces as vLLM streams them.
    def call(oai):
        names, args, finish = [], "", None
        for c in oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=40,
            temperature=0,
            stream=True,
        ):
            for choice in c.choices:
                for tc in choice.delta.tool_calls or ():
                    names += [tc.function.name] if tc.function.name else []
                    args += tc.function.arguments or ""
                finish = choice.finish_reason or finish
        return names, args, finish

    names, args, finish = call(gw)
    assert names == ["get_weather"] and "Paris" in args
    assert (names, args, finish) == call(client(f"http://{onprem}/v1", "unused"))

    # Structured output: response_format reaches vLLM's structured outputs through the member.
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    out = gw.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a city in Italy as JSON."}],
        max_tokens=30,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
    )
    assert json.loads(out.choices[0].message.content)["city"] in ("Paris", "Rome")

    # A client that goes away: vLLM's own running count drops to 0.
    stream = gw.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from 1 to 500."}], max_tokens=1000, stream=True
    )
    for n, _ in enumerate(stream):
        if n == 3:
            break
    assert vllm_running(onprem) == 1
    stream.close()
    deadline = time.monotonic() + 10
    while vllm_running(onprem):
        assert time.monotonic() < deadline, "vLLM still generates for a client that is gone"
        time.sleep(0.1)


def test_the_cloud_takes_only_what_onprem_cannot_and_only_for_tenants_allowed(fleet):
    s, onprem, cloud, keys = fleet
    burst, private = client(f"http://{s.envoy}/v1", keys["burst"]), client(f"http://{s.envoy}/v1", keys["private"])
    wait_ready(burst)
    ask = [{"role": "user", "content": "Say hello."}]
    served_before = vllm_served(cloud)
    stream_chat(burst, ask, max_tokens=4)  # on-prem is free: it stays on-prem
    assert vllm_served(cloud) == served_before

    # Greedy decoding of this prompt repeats "la" to max_tokens: on-prem stays busy for the whole test.
    loop = [{"role": "user", "content": "Say la 2000 times: la la la la la la la la la la la la la la la la"}]
    blocker = private.chat.completions.create(model=MODEL, messages=loop, max_tokens=1500, temperature=0, stream=True)
    next(iter(blocker))  # on-prem's one slot is taken
    results: dict = {}

    def ask_as(name, oai):
        results[name] = stream_chat(oai, ask, max_tokens=4, temperature=0)

    waiting = threading.Thread(target=ask_as, args=("private", private))
    waiting.start()
    ask_as("burst", burst)  # waits 1 s for on-prem, then goes to the cloud
    assert vllm_served(cloud) == served_before + 1
    assert waiting.is_alive(), "the on-prem-only tenant must not have left the premises"
    blocker.close()
    waiting.join(60)
    assert results["private"][1].completion_tokens > 0 and vllm_served(cloud) == served_before + 1
    log = (s.dir / "gateway.log").read_text()
    assert "cloud-key-for-the-test" not in log


def vllm_served(addr: str) -> float:
    """Requests vLLM finished (its vllm:request_success_total)."""
    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(f"http://{addr}/metrics", headers={"Authorization": "Bearer cloud-key-for-the-test"})
    with urllib.request.urlopen(req, timeout=5) as r:
        text = r.read().decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "vllm:request_success"
        for s in f.samples
        if s.name.endswith("_total")
    )
