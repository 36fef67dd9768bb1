"""The Anthropic Messages door through Envoy with the real `anthropic` package (synthetic engine): the
stream's event order, whole answers, tool_use and tool_result blocks, errors in Anthropic's shape naming
the body's fields, keys from x-api-key, count_tokens, hostile bodies beside a running stream. The same
on real vLLM is in tests/e2e/test_agent_apis_vllm.py."""

from __future__ import annotations

import json

import anthropic
import pytest

from tests.helpers import make_config, running_stack
from tests.integration.test_http_api import raw
from tests.integration.test_structured import Canary

MODEL = "smollm2-135m-instruct"
CLOCK = {"name": "get_time", "description": "The time now.", "input_schema": {"type": "object", "properties": {}}}


def _client(s, key="unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"http://{s.envoy}", api_key=key, max_retries=0, timeout=30)


def test_streamed_text_arrives_in_anthropics_event_order(synthetic_stack):
    c = _client(synthetic_stack)
    with c.messages.stream(
        model=MODEL, max_tokens=5, system="Be brief.", messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        kinds = [ev.type for ev in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds[1:3] == ["content_block_start", "text"] or "content_block_start" in kinds
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 5
    assert final.content[0].text == "lorem ipsum dolor sit amet "
    whole = c.messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert whole.content[0].text == "lorem ipsum dolor " and whole.stop_reason == "max_tokens"
    assert whole.usage.input_tokens > 0 and whole.id.startswith("msg_")


def test_raw_stream_has_ping_and_message_delta(synthetic_stack):
    body = {"model": MODEL, "max_tokens": 2, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    status, headers, out = raw(synthetic_stack, "POST", "/v1/messages?beta=true", body, {"x-api-key": "k"})
    assert status == 200 and {k.lower(): v for k, v in headers.items()}["content-type"].startswith("text/event-stream")
    events = [block.split("\n")[0].removeprefix("event: ") for block in out.decode().strip().split("\n\n")]
    assert events == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ], events
    delta = json.loads(out.decode().strip().split("\n\n")[-2].split("data: ", 1)[1])
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 2


def test_tool_use_and_tool_result_round_trip(synthetic_stack):
    c = _client(synthetic_stack)
    messages = [{"role": "user", "content": "time?"}]
    first = c.messages.create(
        model=MODEL, max_tokens=64, messages=messages, tools=[CLOCK], tool_choice={"type": "tool", "name": "get_time"}
    )
    assert first.stop_reason == "tool_use"
    (block,) = first.content
    assert block.type == "tool_use" and block.name == "get_time" and block.input == {}
    with c.messages.stream(
        model=MODEL, max_tokens=64, messages=messages, tools=[CLOCK], tool_choice={"type": "any"}
    ) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].type == "tool_use" and streamed.content[0].input == {}
    messages += [
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "12:00"}]},
    ]
    second = c.messages.create(model=MODEL, max_tokens=4, messages=messages, tools=[CLOCK])
    assert second.stop_reason == "max_tokens" and second.content[0].type == "text"
    assert second.usage.input_tokens > first.usage.input_tokens
    count = c.messages.count_tokens(model=MODEL, messages=messages, tools=[CLOCK])
    assert count.input_tokens > 0


def test_errors_are_anthropic_shaped_and_name_the_body_fields(synthetic_stack):
    s = synthetic_stack
    c = _client(s)
    with pytest.raises(anthropic.BadRequestError) as info:
        c.messages.create(
            model=MODEL,
            max_tokens=5,
            system="sys",
            messages=[{"role": "user", "content": "ok"}, {"role": "tool", "content": "x"}],
        )
    assert info.value.body["type"] == "error" and "messages[1].role" in info.value.body["error"]["message"]
    canary = Canary(s.gateway_stub())
    deep = json.loads('{"a":' * 600 + "1" + "}" * 600)
    hostile = [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"stop_sequences": "x"}, "stop_sequences"),
        ({"tools": [{"name": "f", "input_schema": deep}]}, "tools[0].input_schema"),
        ({"tools": [{"name": "f" * 65, "input_schema": {}}]}, "tools[0].name"),
        ({"tools": [{"name": f"f{i}", "input_schema": {}} for i in range(3000)]}, "tools"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
        ({"tool_choice": {"type": "any"}}, "tools"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": 5}]}]}, "tool_use_id"),
        ({"top_k": 5}, "top_k"),
        ({"messages": []}, "messages"),
    ]
    for extra, field in hostile:
        body = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], **extra}
        status, _, out = raw(s, "POST", "/v1/messages", body)
        err = json.loads(out)
        assert status == 400 and err["type"] == "error" and field in err["error"]["message"], (field, err)
        assert len(err["error"]["message"]) < 400
    status, _, out = raw(s, "POST", "/v1/messages", b'{"model": "x", "messages": [')
    assert status == 400 and json.loads(out)["error"]["type"] == "invalid_request_error"
    assert canary.tokens() == 60


def test_a_long_prefill_gets_keepalives_on_every_http_api(tmp_path):
    """A stream silent for a long prefill gets keep-alive events (Anthropic's ping, an SSE comment on the
    OpenAI APIs) every gateway.sse_keepalive_ms, and the SDKs read through them."""
    cfg = make_config(
        "synthetic",
        worker={"synthetic": {"tokens_per_s": 50, "first_token_delay_ms": 1_000}},
        gateway={"sse_keepalive_ms": 200},
    )
    with running_stack(tmp_path, cfg) as s:
        body = {"model": MODEL, "max_tokens": 2, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        _, _, out = raw(s, "POST", "/v1/messages", body)
        head = out.decode().split("content_block_delta")[0]
        assert head.count("event: ping") >= 4, out  # the first, then one per 200 ms of the 1 s prefill
        _, _, out = raw(s, "POST", "/v1/chat/completions", body)
        assert out.decode().split('"content": "lorem')[0].count(": keep-alive\n\n") >= 3, out
        _, _, out = raw(s, "POST", "/v1/responses", {"input": "hi", "max_output_tokens": 2, "stream": True})
        assert out.decode().count(": keep-alive\n\n") >= 3, out
        with _client(s).messages.stream(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}]) as st:
            assert st.get_final_message().content[0].text == "lorem ipsum "


def test_claude_codes_request_shape_is_served(synthetic_stack):
    """What Claude Code sends on every request: max_tokens 32,000 (a ceiling: lowered to what fits),
    thinking, context_management and output_config hints, system blocks with cache_control, a
    mid-conversation system message, its session header."""
    body = {
        "model": MODEL,
        "max_tokens": 32_000,
        "stream": True,
        "stop_sequences": ["amet"],
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": '{"device_id":"d","session_id":"a3a2abe0-381c-472c-82ef-94087c7f7b7d"}'},
        "system": [
            {"type": "text", "text": "You are an agent."},
            {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
            {"role": "system", "content": "Available agent types: none."},
        ],
        "tools": [CLOCK],
    }
    headers = {
        "x-claude-code-session-id": "a3a2abe0-381c-472c-82ef-94087c7f7b7d",
        "anthropic-beta": "claude-code-20250219",
    }
    status, _, out = raw(synthetic_stack, "POST", "/v1/messages?beta=true", body, headers)
    assert status == 200, out
    text = "".join(
        json.loads(b.split("data: ", 1)[1])["delta"].get("text", "")
        for b in out.decode().strip().split("\n\n")
        if b.startswith("event: content_block_delta")
    )
    assert text == "lorem ipsum dolor sit ", out
    body["output_config"] = {"format": {"type": "json_schema", "schema": {}}}
    status, _, out = raw(synthetic_stack, "POST", "/v1/messages", body)
    assert status == 400 and "output_config.format" in json.loads(out)["error"]["message"]
