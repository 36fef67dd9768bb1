"""Tool calling through both doors on the synthetic engine: the gateway's part (the OpenAI and Execute
shapes of streamed and whole calls, history with calls and results, sessions, bounds and field names,
hostile tools beside a running stream). That a real model's calls are parsed and forced by a grammar is
shown on real vLLM in tests/e2e/test_tools_vllm.py.

The synthetic engine answers a forced choice (required or named) with a call of the tool, no arguments,
in three steps; with ``auto`` it writes its usual words."""

from __future__ import annotations

import json

import grpc
import openai
import pytest

from gateway.v1 import gateway_pb2 as gpb
from tests.integration.test_http_api import raw
from tests.integration.test_structured import Canary, _field

MODEL = "smollm2-135m-instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def _client(s) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{s.envoy}/v1", api_key="none", max_retries=0, timeout=30)


def test_openai_streamed_forced_call_has_openai_shape(synthetic_stack):
    chunks = list(
        _client(synthetic_stack).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "what time is it?"}],
            tools=[WEATHER, CLOCK],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            stream=True,
        )
    )
    pieces = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert pieces, "no tool_calls deltas"
    first = pieces[0]
    assert first.index == 0 and first.type == "function" and first.id.startswith("call_")
    assert first.function.name == "get_time"
    assert all(p.id is None and p.function.name is None for p in pieces[1:])  # id and name once
    assert json.loads("".join(p.function.arguments or "" for p in pieces)) == {}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


def test_openai_two_turn_agent_loop_and_whole_answers(synthetic_stack):
    c = _client(synthetic_stack)
    messages = [{"role": "user", "content": "weather in Oslo?"}]
    first = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="required")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {}
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 3}'},
    ]
    second = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=5)
    assert second.choices[0].finish_reason == "length" and second.choices[0].message.content
    assert second.choices[0].message.tool_calls is None
    # The history's calls and results count in the prompt.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_execute_streams_tool_call_deltas(synthetic_stack):
    stub = synthetic_stack.gateway_stub()
    req = gpb.ExecuteRequest(
        task="weather?",
        tools=[gpb.Tool(name="get_weather", parameters_json_schema=json.dumps(WEATHER["function"]["parameters"]))],
        tool_choice=gpb.ToolChoice(mode=gpb.TOOL_CHOICE_MODE_REQUIRED),
    )
    out = list(stub.Execute(req, timeout=30))
    pieces = [tc for r in out if r.HasField("delta") for tc in r.delta.tool_calls]
    assert pieces[0].name == "get_weather" and pieces[0].id.startswith("call_")
    assert json.loads("".join(p.arguments for p in pieces)) == {}
    assert out[-1].done.finish_reason == gpb.FINISH_REASON_TOOL_CALLS
    assert out[-1].done.usage.completion_tokens == sum(r.delta.tokens for r in out if r.HasField("delta"))
    # A call and its result in the history, on the next turn.
    history = [
        gpb.ChatMessage(role="user", content="weather?"),
        gpb.ChatMessage(
            role="assistant",
            tool_calls=[gpb.ToolCall(id=pieces[0].id, name="get_weather", arguments_json='{"city": "Oslo"}')],
        ),
        gpb.ChatMessage(role="tool", tool_call_id=pieces[0].id, content="3 C"),
    ]
    out = list(
        stub.Execute(gpb.ExecuteRequest(messages=history, tools=req.tools, sampling=gpb.SamplingParams(max_tokens=3)))
    )
    assert out[-1].done.finish_reason == gpb.FINISH_REASON_LENGTH


def _status(s, body):
    status, _, out = raw(s, "POST", "/v1/chat/completions", body)
    return status, json.loads(out)


def test_hostile_tools_are_refused_beside_a_running_stream(synthetic_stack):
    s = synthetic_stack
    stub = s.gateway_stub()
    canary = Canary(stub)
    chat = [{"role": "user", "content": "hi"}]
    deep = json.loads('{"a":' * 600 + "1" + "}" * 600)

    def tool(name="f", parameters=None):
        return {"type": "function", "function": {"name": name, "parameters": parameters or {"type": "object"}}}

    cases = [
        ({"tools": [tool(str(i)) for i in range(5000)]}, "tools"),
        ({"tools": [tool(parameters={"description": "x" * 70_000})]}, "tools[0].function.parameters"),
        ({"tools": [tool(parameters=deep)]}, "tools[0].function.parameters"),
        ({"tools": [tool("x" * 65)]}, "tools[0].function.name"),
        ({"tools": [tool("bad name")]}, "tools[0].function.name"),
        ({"tools": [tool(), tool()]}, "tools[1].function.name"),
        ({"tools": [tool(parameters=[1])]}, "tools[0].function.parameters"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0]"),
        ({"tools": [tool()], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tools"),
        ({"tools": [tool()], "response_format": {"type": "json_object"}}, "tools"),
        ({"tools": [tool()], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        (
            {
                "messages": [
                    {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": {}}}]}
                ]
            },
            "messages[0].tool_calls[0]",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "tool_calls": [{"id": "c 1", "function": {"name": "f", "arguments": "{}"}}]}
                ]
            },
            "messages[0].tool_calls[0].id",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c1"}]}, "messages[0].tool_call_id"),
    ]
    for extra, param in cases:
        status, body = _status(s, {"messages": chat, **extra})
        assert status == 400 and body["error"]["param"] == param, (param, body)
        assert len(body["error"]["message"]) < 300
    # Invalid JSON where a tool is expected, and the same bounds on Execute.
    status, _, out = raw(s, "POST", "/v1/chat/completions", b'{"messages": [], "tools": [{"type": "function", ')
    assert status == 400
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Execute(gpb.ExecuteRequest(task="x", tools=[gpb.Tool(name="f", parameters_json_schema="{nope")])))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _field(info.value) == "tools[0].parameters_json_schema"
    assert canary.tokens() == 60
