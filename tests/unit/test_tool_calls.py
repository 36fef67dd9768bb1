"""The tool-call format's pieces on their own: the Hermes parser (streamed in random cuts), vLLM's parser
behind our adapter (a call cut off before its name is not finished into the previous one), the fallback
conversation and the forced-choice grammar (compiled by llguidance)."""

from __future__ import annotations

import json
import random

import llguidance
import pytest

from igw_common.tool_calls import HermesParser, ToolSpec, conversation, forced_grammar
from igw_worker_api.v1 import worker_pb2 as wpb

OUTPUT = (
    'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "n": [1, {"a": "}"}]}}\n</tool_call>\n'
    '<tool_call>\n{"name": "f2", "arguments": {}}\n</tool_call>'
)


def _joined(parser, pieces):
    content, calls = "", {}
    for piece in pieces:
        text, deltas = parser.feed(piece)
        content += text
        for d in deltas:
            call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            if d.id:
                assert not call["id"], "a call's id comes once"
                call["id"], call["name"] = d.id, d.name
            call["arguments"] += d.arguments
    text, deltas = parser.finish()
    return content + text, calls, deltas


@pytest.mark.parametrize("seed", range(20))
def test_hermes_parser_streams_the_same_calls_however_the_text_is_cut(seed):
    rng = random.Random(seed)
    cuts, i = [], 0
    while i < len(OUTPUT):
        n = rng.randint(1, 6)
        cuts.append(OUTPUT[i : i + n])
        i += n
    content, calls, _ = _joined(HermesParser(), cuts)
    assert content == "Sure.\n"
    assert [calls[k]["name"] for k in sorted(calls)] == ["get_weather", "f2"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Oslo", "n": [1, {"a": "}"}]}
    assert json.loads(calls[1]["arguments"]) == {}
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_hermes_parser_holds_a_possible_tag_and_gives_it_back():
    p = HermesParser()
    assert p.feed("hello <tool")[0] == "hello "
    assert p.feed("box")[0] == "<toolbox"
    assert p.finish() == ("", []) and not p.called


def test_vllm_hermes_parser_behind_the_adapter():
    from vllm.tokenizers import get_tokenizer

    from inference.embedded_model import default_cache_dir
    from inference.tool_parsing import VllmToolCalls, parser_class

    tok = get_tokenizer(str(default_cache_dir() / "models" / "smollm2-135m-instruct"))
    spec = ToolSpec((("get_time", "", {"type": "object"}),), "required")
    adapter = VllmToolCalls(parser_class("hermes"), tok, spec, "m")
    text = OUTPUT.replace("get_weather", "get_time") + '\n<tool_call>\n{"name": "get_ti'
    pieces = [tok.decode([i]) for i in tok.encode(text, add_special_tokens=False)]
    content, calls, finished = _joined(adapter, pieces)
    assert content.strip() == "Sure."
    assert json.loads(calls[0]["arguments"]) == {"city": "Oslo", "n": [1, {"a": "}"}]}
    assert json.loads(calls[1]["arguments"]) == {} and len(calls) == 2
    assert finished == []  # the third call has no name yet: nothing is added to the second
    with pytest.raises(ValueError, match="no vLLM tool parser is named"):
        parser_class("hermes-nope")


def test_fallback_conversation_writes_calls_and_results_in_hermes_format():
    spec = ToolSpec((("get_time", "The time.", {"type": "object"}),))
    messages = [
        wpb.ChatMessage(role="system", content="Be brief."),
        wpb.ChatMessage(role="assistant", tool_calls=[wpb.ToolCall(id="c1", name="get_time", arguments_json="{}")]),
        wpb.ChatMessage(role="tool", tool_call_id="c1", content="12:00"),
    ]
    out, tools = conversation(messages, spec, native=False)
    assert tools is None
    assert out[0]["content"].startswith("Be brief.\n\nYou may call functions") and '"get_time"' in out[0]["content"]
    assert out[1]["content"] == '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert out[2] == {"role": "user", "content": "<tool_response>\n12:00\n</tool_response>"}
    native, tools = conversation(messages, spec, native=True)
    assert native[1]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": {}}
    assert native[2]["tool_call_id"] == "c1" and tools[0]["function"]["name"] == "get_time"


def test_forced_grammars_compile_and_auto_has_none():
    tools = (("a", "", {"type": "object", "properties": {"x": {"type": "integer"}}}), ("b", "", {"type": "object"}))
    assert forced_grammar(ToolSpec(tools, "auto")) is None
    for spec in (ToolSpec(tools, "named", "b"), ToolSpec(tools, "required"), ToolSpec(tools, "required", "", False)):
        grammar = forced_grammar(spec)
        assert llguidance.LLMatcher.validate_grammar(llguidance.grammar_from("lark", grammar)) == ""
    assert '"const": "b"' in forced_grammar(ToolSpec(tools, "named", "b"))
    assert '"const": "a"' not in forced_grammar(ToolSpec(tools, "named", "b"))
