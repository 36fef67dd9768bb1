"""The OpenAI Responses door through Envoy with the real `openai` package's ``client.responses`` (synthetic
engine): typed stream events in order, whole responses, function_call and function_call_output items,
text.format, errors naming the body's fields, hostile bodies beside a running stream."""

from __future__ import annotations

import json

import openai
import pytest

from gateway.doors.responses_api import response_id
from tests.integration.test_http_api import raw
from tests.integration.test_structured import Canary

MODEL = "smollm2-135m-instruct"
CLOCK = {"type": "function", "name": "get_time", "description": "The time now.", "parameters": {"type": "object"}}


def _client(s) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{s.envoy}/v1", api_key="unused", max_retries=0, timeout=30)


def test_streamed_and_whole_text(synthetic_stack):
    c = _client(synthetic_stack)
    with c.responses.stream(model=MODEL, instructions="Be brief.", input="hi", max_output_tokens=5) as stream:
        events = list(stream)
    kinds = [ev.type for ev in events]
    final = events[-1].response  # at max_output_tokens the last event is response.incomplete (no completed)
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert kinds.count("response.output_text.delta") == 5
    assert final.output[0].content[0].text == "lorem ipsum dolor sit amet " and final.status == "incomplete"
    assert final.incomplete_details.reason == "max_output_tokens" and final.usage.output_tokens == 5
    whole = c.responses.create(model=MODEL, input=[{"role": "user", "content": "hi"}], max_output_tokens=3)
    assert whole.output_text == "lorem ipsum dolor " and whole.id.startswith("resp_")
    status, _, out = raw(synthetic_stack, "POST", "/v1/responses", {"model": MODEL, "input": "hi", "stream": True})
    seqs = [json.loads(b.split("data: ", 1)[1])["sequence_number"] for b in out.decode().strip().split("\n\n")]
    assert status == 200 and seqs == list(range(len(seqs)))


def test_function_call_and_its_output(synthetic_stack):
    c = _client(synthetic_stack)
    first = c.responses.create(model=MODEL, input="time?", tools=[CLOCK], tool_choice="required")
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_time" and json.loads(call.arguments) == {}
    assert first.status == "completed"
    with c.responses.stream(
        model=MODEL, input="time?", tools=[CLOCK], tool_choice={"type": "function", "name": "get_time"}
    ) as stream:
        kinds = [ev.type for ev in stream]
        streamed = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert streamed.output[0].type == "function_call" and streamed.output[0].arguments == "{}"
    second = c.responses.create(
        model=MODEL,
        tools=[CLOCK],
        max_output_tokens=3,
        input=[
            {"role": "user", "content": "time?"},
            {"type": "function_call", "call_id": call.call_id, "name": "get_time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": call.call_id, "output": "12:00"},
        ],
    )
    assert second.output_text == "lorem ipsum dolor "
    assert second.usage.input_tokens > first.usage.input_tokens


def test_errors_name_the_body_fields_beside_a_running_stream(synthetic_stack):
    s = synthetic_stack
    canary = Canary(s.gateway_stub())
    deep = json.loads('{"a":' * 600 + "1" + "}" * 600)
    cases = [
        ({"input": []}, "input"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"input": [{"type": "image", "url": "x"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content[0]"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"tools": [{"type": "web_search"}, {"type": "shell_call"}]}, "tools[1]"),
        ({"tools": [{"type": "function", "name": "f", "parameters": deep}]}, "tools[0].parameters"),
        ({"tools": [{"type": "function", "name": f"f{i}"} for i in range(3000)]}, "tools"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": deep}}}, "text.format.schema"),
        ({"previous_response_id": 5}, "previous_response_id"),
        ({"store": "yes"}, "store"),
        ({"frequency_penalty": 1}, "frequency_penalty"),
    ]
    for extra, param in cases:
        status, _, out = raw(s, "POST", "/v1/responses", {"model": MODEL, "input": "hi", **extra})
        err = json.loads(out)["error"]
        assert status == 400 and err["param"] == param, (param, err)
    with pytest.raises(openai.BadRequestError):
        _client(s).responses.create(model=MODEL, input="hi", max_output_tokens=-1)
    status, _, out = raw(s, "POST", "/v1/responses", {"model": MODEL, "input": "hi", "previous_response_id": "resp_1"})
    assert status == 404 and json.loads(out)["error"]["param"] == "previous_response_id"
    # A well-formed id, but this gateway keeps no sessions (gateway.sessions.enabled is off).
    body = {"model": MODEL, "input": "hi", "previous_response_id": response_id("s", 0)}
    status, _, out = raw(s, "POST", "/v1/responses", body)
    assert status == 400 and "gateway.sessions.enabled" in json.loads(out)["error"]["message"]
    status, _, out = raw(s, "GET", "/v1/responses/" + response_id("s", 0))
    assert status == 501 and json.loads(out)["error"]["code"] == "sessions_off"
    assert canary.tokens() == 60


def test_codex_clis_request_shape_is_served(synthetic_stack):
    """What Codex CLI sends: developer messages, store false, reasoning and include, prompt_cache_key,
    client_metadata, a hosted web_search tool and a namespace of sub-agent tools (both left out), its
    session-id header."""
    fn = {
        "type": "function",
        "name": "shell",
        "description": "Run a command.",
        "strict": False,
        "parameters": {"type": "object"},
    }
    body = {
        "model": MODEL,
        "stream": True,
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "You are Codex."}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        ],
        "tools": [
            fn,
            {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.", "tools": [fn]},
            {"type": "web_search", "external_web_access": False},
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"summary": "auto"},
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "01a23b0b-7ab3-7b81-b6b1-1cb76ddf413a",
        "client_metadata": {"thread_id": "01a23b0b", "turn_id": "01a23b0c"},
        "max_output_tokens": 3,
    }
    status, _, out = raw(synthetic_stack, "POST", "/v1/responses", body, {"session-id": "01a23b0b-7ab3-7b81"})
    assert status == 200, out
    last = json.loads(out.decode().strip().split("\n\n")[-1].split("data: ", 1)[1])
    assert last["type"] == "response.incomplete" and last["response"]["usage"]["output_tokens"] == 3
