"""The APIs agents speak, on real vLLM through Envoy (embedded model): the `anthropic` package's Messages
and the `openai` package's Responses (``client.responses``): streamed text, a forced tool call whose
arguments validate, the tool's result sent back and answered, and a stream cancelled mid-way that frees
the engine (vLLM's own unfinished count back to 0) and is charged; a stored response continued by
``previous_response_id``."""

from __future__ import annotations

import json
import time

import anthropic
import jsonschema
import openai
import pytest

from tests.e2e.test_tools_vllm import WEATHER_ARGS
from tests.integration.test_observability import delta, scrape

pytestmark = pytest.mark.vllm
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def claude(vllm_stack):
    return anthropic.Anthropic(base_url=f"http://{vllm_stack.envoy}", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def oai(vllm_stack):
    return openai.OpenAI(base_url=f"http://{vllm_stack.envoy}/v1", api_key="unused", max_retries=0, timeout=300)


def _engine_idle(s) -> bool:
    load, _ = s.wait_worker_idle(10)
    return load.engine_unfinished_requests == 0 and load.active_requests == 0


def _cancel_midway(s, open_stream, read_one) -> None:
    """Open a long stream, read a little, close it; the engine is freed and the tokens are charged."""
    metrics = s.config["gateway"]["metrics_listen"]
    before = scrape(metrics)
    stream = open_stream()
    read_one(stream)
    stream.close()
    assert _engine_idle(s)
    time.sleep(0.3)  # the gateway settles the request as its handler unwinds
    after = scrape(metrics)
    assert delta(before, after, "igw_requests_total", code="CANCELLED") == 1
    assert delta(before, after, "igw_tokens_total", type="output") >= 1  # charged for what was generated


def test_messages_stream_tool_call_and_result(vllm_stack, claude):
    with claude.messages.stream(
        model=MODEL, max_tokens=24, messages=[{"role": "user", "content": "Say hello."}], extra_body={"temperature": 0}
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.strip() and final.content[0].text == text and final.stop_reason in ("end_turn", "max_tokens")
    tool = {"name": "get_weather", "description": "The weather in a city now.", "input_schema": WEATHER_ARGS}
    messages = [{"role": "user", "content": "What is the weather in Lima?"}]
    first = claude.messages.create(
        model=MODEL,
        max_tokens=96,
        extra_body={"temperature": 1.0},
        messages=messages,
        tools=[tool],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert first.stop_reason == "tool_use", first
    (call,) = [b for b in first.content if b.type == "tool_use"]
    jsonschema.validate(call.input, WEATHER_ARGS)
    messages += [
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C, cloudy"}]},
    ]
    second = claude.messages.create(
        model=MODEL, max_tokens=48, messages=messages, tools=[tool], tool_choice={"type": "none"}
    )
    assert second.stop_reason in ("end_turn", "max_tokens") and second.content[0].text.strip(), second
    assert second.usage.input_tokens > first.usage.input_tokens
    _cancel_midway(
        vllm_stack,
        lambda: claude.messages.create(
            model=MODEL, max_tokens=400, stream=True, messages=[{"role": "user", "content": "Count to 300."}]
        ),
        lambda stream: [next(iter(stream)) for _ in range(4)],
    )


def test_responses_stream_function_call_and_output(vllm_stack, oai):
    text, kinds = "", []
    with oai.responses.stream(model=MODEL, input="Say hello.", max_output_tokens=24, temperature=0) as stream:
        for ev in stream:
            kinds.append(ev.type)
            if ev.type == "response.output_text.delta":
                text += ev.delta
    assert (
        text.strip() and kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    )
    tool = {"type": "function", "name": "get_weather", "description": "The weather now.", "parameters": WEATHER_ARGS}
    first = oai.responses.create(
        model=MODEL,
        input="What is the weather in Lima?",
        tools=[tool],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=96,
        temperature=1.0,
    )
    (call,) = [o for o in first.output if o.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), WEATHER_ARGS)
    second = oai.responses.create(
        model=MODEL,
        tools=[tool],
        tool_choice="none",
        max_output_tokens=48,
        temperature=0,
        input=[
            {"role": "user", "content": "What is the weather in Lima?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "18 C, cloudy"},
        ],
    )
    assert second.output_text.strip() and second.usage.input_tokens > first.usage.input_tokens
    _cancel_midway(
        vllm_stack,
        lambda: oai.responses.create(model=MODEL, input="Count to 300.", max_output_tokens=400, stream=True),
        lambda stream: [next(iter(stream)) for _ in range(6)],
    )


def test_responses_previous_response_id_continues_the_stored_conversation(oai):
    first = oai.responses.create(
        model=MODEL, instructions="Be brief.", input="My name is Ada.", max_output_tokens=16, temperature=0
    )
    second = oai.responses.create(
        model=MODEL,
        instructions="Be brief.",
        input="What is my name?",
        previous_response_id=first.id,
        max_output_tokens=16,
        temperature=0,
    )
    # vLLM's tokenizer counted the stored turn (question and answer) again in the second prompt.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    back = oai.responses.retrieve(second.id)
    assert back.output_text == second.output_text and back.usage.input_tokens == second.usage.input_tokens
    print("\nRESPONSES CONTINUED", json.dumps({"first": first.output_text, "second": second.output_text}))
