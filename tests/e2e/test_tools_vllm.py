"""Tool calling on real vLLM through Envoy, embedded model: the `openai` package's streamed and whole
tool calls, a two-turn agent loop, Execute from a client generated from protos/, and a stock vLLM gRPC
server as the only pool member. A named or required choice is forced by a grammar over the tool's
schema, so even the 135M model's arguments validate.

The same run prints the TTFT and tokens/s of a tool-carrying request against the same request without
tools (``TOOLS BENCH``), for the closing note; nothing here asserts a speed."""

from __future__ import annotations

import json
import time

import jsonschema
import openai
import pytest

from gateway.v1 import gateway_pb2 as gpb
from tests.e2e.test_structured_vllm import stock_only  # noqa: F401 (a fixture)

pytestmark = pytest.mark.vllm
MODEL = "smollm2-135m-instruct"
WEATHER_ARGS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 32},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city now.", "parameters": WEATHER_ARGS},
}
TIME_ARGS = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 40}},
    "required": ["timezone"],
    "additionalProperties": False,
}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now.", "parameters": TIME_ARGS}}
SCHEMAS = {"get_weather": WEATHER_ARGS, "get_time": TIME_ARGS}


@pytest.fixture(scope="module")
def oai(vllm_stack):
    return openai.OpenAI(base_url=f"http://{vllm_stack.envoy}/v1", api_key="unused", max_retries=0, timeout=300)


def _stream_calls(chunks):
    """(calls as {index: [id, name, arguments]}, content, finish_reason, first-chunk time, usage)."""
    calls, content, finish, first_at, usage = {}, "", None, None, None
    for ch in chunks:
        if ch.usage is not None:
            usage = ch.usage
        if not ch.choices:
            continue
        c = ch.choices[0]
        if (c.delta.content or c.delta.tool_calls) and first_at is None:
            first_at = time.monotonic()
        content += c.delta.content or ""
        for tc in c.delta.tool_calls or ():
            call = calls.setdefault(tc.index, [None, None, ""])
            if tc.id:
                assert call[0] is None, "a call's id comes once"
                call[0], call[1] = tc.id, tc.function.name
            call[2] += tc.function.arguments or ""
        finish = c.finish_reason or finish
    return calls, content, finish, first_at, usage


def test_a_streamed_forced_call_arrives_in_openai_deltas_whose_arguments_validate(oai):
    start = time.monotonic()
    chunks = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=1.0,
        max_tokens=96,
        stream=True,
        stream_options={"include_usage": True},
    )
    calls, content, finish, _, _ = _stream_calls(chunks)
    assert finish == "tool_calls" and not content.strip(), (finish, content)
    ((call_id, name, arguments),) = calls.values()
    assert call_id and name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER_ARGS)
    assert time.monotonic() - start < 300


def test_a_two_turn_agent_loop_completes(oai):
    messages = [
        {"role": "system", "content": "You are a helpful assistant. Use the tools."},
        {"role": "user", "content": "What time is it in Tokyo?"},
    ]
    first = oai.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        parallel_tool_calls=False,  # one call: the grammar ends the answer after it
        max_tokens=96,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and all(c.function.name in SCHEMAS for c in calls)
    for c in calls:
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
    # The test runs the tools; their results go back as tool messages.
    messages.append(choice.message.model_dump(exclude_none=True))
    for c in calls:
        result = {"time": "14:05"} if c.function.name == "get_time" else {"celsius": 12}
        messages.append({"role": "tool", "tool_call_id": c.id, "content": json.dumps(result)})
    second = oai.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER, CLOCK], tool_choice="none", max_tokens=48, temperature=0
    )
    answer = second.choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.content.strip(), answer
    assert answer.message.tool_calls is None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result were rendered


def _execute_call(stub, **extra):
    req = gpb.ExecuteRequest(
        task="What is the weather in Paris?",
        tools=[
            gpb.Tool(
                name="get_weather", description="The weather now.", parameters_json_schema=json.dumps(WEATHER_ARGS)
            )
        ],
        tool_choice=gpb.ToolChoice(function_name="get_weather"),
        sampling=gpb.SamplingParams(max_tokens=96, temperature=1.0),
        **extra,
    )
    out = list(stub.Execute(req, timeout=300))
    pieces = [tc for r in out if r.HasField("delta") for tc in r.delta.tool_calls]
    assert out[-1].done.finish_reason == gpb.FINISH_REASON_TOOL_CALLS, out[-1]
    assert [p.name for p in pieces if p.name] == ["get_weather"] and pieces[0].id
    jsonschema.validate(json.loads("".join(p.arguments for p in pieces)), WEATHER_ARGS)
    return out


def test_execute_forced_call_validates(vllm_stack):
    _execute_call(vllm_stack.gateway_stub())
    assert vllm_stack.wait_worker_idle(10)[0].engine_unfinished_requests == 0


def test_a_stock_vllm_grpc_member_forces_and_parses_calls(stock_only):  # noqa: F811
    _execute_call(stock_only)


def _timed(oai, tools: bool):
    extra = {"tools": [WEATHER, CLOCK], "tool_choice": "auto"} if tools else {}
    start = time.monotonic()
    chunks = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a haiku about the sea."}],
        max_tokens=64,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        **extra,
    )
    calls, content, finish, first_at, usage = _stream_calls(chunks)
    end = time.monotonic()
    ttft = first_at - start
    return ttft, usage.completion_tokens / max(end - first_at, 1e-6), usage.prompt_tokens


def test_tools_bench_prints_ttft_and_rate_with_and_without_tools(oai):
    rows = {}
    for tools in (False, True, False, True):  # interleaved: the machine's noise hits both alike
        rows.setdefault(tools, []).append(_timed(oai, tools))
    med = {k: sorted(v)[len(v) // 2] for k, v in rows.items()}
    (t0, r0, p0), (t1, r1, p1) = med[False], med[True]
    print(
        f"\nTOOLS BENCH (auto, 2 tools, vLLM CPU): TTFT {t1 * 1000:.0f} ms with tools vs {t0 * 1000:.0f} ms without "
        f"({t1 / t0:.2f}x; prompt {p1} vs {p0} tokens); {r1:.1f} vs {r0:.1f} tokens/s ({r1 / r0:.2f}x)"
    )
    assert p1 > p0  # the tools were rendered into the prompt
