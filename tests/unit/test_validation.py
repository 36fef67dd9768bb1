"""Request validation without processes: limits checked before the work that grows with them."""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from gateway.core import validation
from gateway.doors import execute_wire
from gateway.errors import RpcError
from gateway.request import RequestDraft, estimate_prompt_tokens
from gateway.v1 import gateway_pb2 as gpb
from igw_common.config import Limits


def _validate(req, limits):
    """The gRPC door's reading of ``req``, through the one validator."""
    return validation.validate(execute_wire.draft(req), limits)


def _field(fn) -> str:
    with pytest.raises(RpcError) as info:
        fn()
    return info.value.field


def test_oversized_context_is_refused_before_any_conversion(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the context was converted before its size was checked")

    monkeypatch.setattr(json_format, "MessageToDict", forbidden)
    req = gpb.ExecuteRequest(task="x")
    req.context.update({f"k{i}": "v" * 300 for i in range(10_000)})  # ~3 MB
    assert _field(lambda: _validate(req, Limits())) == "context"


def test_context_limits_depth_numbers_and_exact_size():
    limits = Limits(max_context_bytes=100, max_context_depth=3)
    ok = gpb.ExecuteRequest(task="x")
    ok.context.update({"a": {"b": [1, "two", None, True]}})
    v = _validate(ok, limits)
    assert v.messages[0].content.endswith('{"a":{"b":[1.0,"two",null,true]}}')
    deep = gpb.ExecuteRequest(task="x")
    deep.context.update({"a": {"b": {"c": {"d": 1}}}})
    assert _field(lambda: _validate(deep, limits)) == "context"
    nan = gpb.ExecuteRequest(task="x")
    nan.context.update({"a": float("nan")})
    assert _field(lambda: _validate(nan, limits)) == "context"
    # Control characters grow ~6x as JSON: the exact size counts, not the lower bound.
    ctrl = gpb.ExecuteRequest(task="x")
    ctrl.context.update({"a": "\x01" * 30})
    assert _field(lambda: _validate(ctrl, limits)) == "context"


def test_prompt_bytes_limit_counts_every_part():
    limits = Limits(max_prompt_bytes=1_000)
    req = gpb.ExecuteRequest(task="é" * 300, messages=[gpb.ChatMessage(role="user", content="é" * 201)])
    assert _field(lambda: _validate(req, limits)) == "messages"  # 1,002 bytes of text
    assert _validate(gpb.ExecuteRequest(task="é" * 499), limits).messages[-1].content == "é" * 499


@pytest.mark.parametrize("rid", ["abc\n", "a" * 129, "a b", "ü", "\n"])
def test_request_id_pattern_is_anchored(rid):
    assert _field(lambda: _validate(gpb.ExecuteRequest(task="x", request_id=rid), Limits())) == "request_id"


@pytest.mark.parametrize("sid", ["\udc80", "a\x00b", "x\ny", "a" * 129])
def test_session_ids_are_bounded_printable_text(sid):
    """An HTTP header's non-UTF-8 bytes arrive as lone surrogates: refused, not a key into the store."""
    draft = RequestDraft(task="x", session_id=sid)
    assert _field(lambda: validation.validate(draft, Limits())) == "session_id"
    assert validation.validate(RequestDraft(task="x", session_id="bad id ²"), Limits()).session_id == "bad id ²"


def test_client_strings_are_not_echoed():
    huge = "M" * 100_000
    for req in (
        gpb.ExecuteRequest(task="x", model=huge),
        gpb.ExecuteRequest(messages=[gpb.ChatMessage(role=huge, content="x")]),
    ):
        with pytest.raises(RpcError) as info:
            _validate(req, Limits())
        assert len(info.value.message) < 200


def test_estimate_is_in_tokens_not_bytes():
    from igw_worker_api.v1 import worker_pb2 as wpb

    msgs = [wpb.ChatMessage(role="user", content="word " * 10_000)]  # 50 kB
    assert estimate_prompt_tokens(msgs) < 20_000


def _constrained(**kind) -> gpb.ExecuteRequest:
    return gpb.ExecuteRequest(task="x", constraint=gpb.OutputConstraint(**kind))


def test_a_schema_is_bounded_parsed_and_kept_in_its_order():
    limits = Limits(max_schema_bytes=200, max_schema_depth=3)
    schema = '{"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"}}}'
    got = _validate(_constrained(json_schema=schema), limits).constraint
    assert got.json_schema == '{"type":"object","properties":{"b":{"type":"string"},"a":{"type":"integer"}}}'
    too_big = '{"description": "' + "x" * 300 + '"}'
    too_deep = '{"a": {"b": {"c": {"d": 1}}}}'
    for bad in (too_big, too_deep, "[1, 2]", "{not json", '{"a": NaN}', '{"a": Infinity}'):
        assert _field(lambda b=bad: _validate(_constrained(json_schema=b), limits)) == "constraint.json_schema", bad


def test_choices_regexes_and_empty_constraints_are_bounded():
    limits = Limits(max_choices=2, max_choice_chars=3, max_regex_chars=5)
    assert list(
        _validate(_constrained(choice=gpb.ChoiceList(choices=["yes", "no"])), limits).constraint.choice.choices
    ) == ["yes", "no"]
    assert (
        _field(lambda: _validate(_constrained(choice=gpb.ChoiceList(choices=["a", "b", "c"])), limits))
        == "constraint.choice"
    )
    assert (
        _field(lambda: _validate(_constrained(choice=gpb.ChoiceList(choices=["a", "long"])), limits))
        == "constraint.choice[1]"
    )
    assert _field(lambda: _validate(_constrained(regex="[a-z]+$$"), limits)) == "constraint.regex"
    assert _field(lambda: _validate(_constrained(json_object=False), limits)) == "constraint.json_object"
    assert (
        _field(lambda: _validate(gpb.ExecuteRequest(task="x", constraint=gpb.OutputConstraint()), limits))
        == "constraint"
    )


def test_the_openai_door_names_its_own_fields():
    from gateway.doors import openai_api

    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"a": [[[[1]]]]}}},
        "max_completion_tokens": 5,
    }
    reading = openai_api.chat_request(body, {})
    with pytest.raises(RpcError) as info:
        validation.validate(reading.draft, Limits(max_schema_depth=2))
    status, err = openai_api.error_body(info.value, reading.names)
    assert (status, err["error"]["param"]) == (400, "response_format.json_schema.schema")
    assert err["error"]["message"].startswith("response_format.json_schema.schema: nested deeper")
    body.update(response_format={"type": "json_object"}, max_completion_tokens=0)
    reading = openai_api.chat_request(body, {})
    with pytest.raises(RpcError) as info:
        validation.validate(reading.draft, Limits())
    assert openai_api.error_body(info.value, reading.names)[1]["error"]["param"] == "max_completion_tokens"
    for bad in ({"type": "grammar"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"name": "a b"}}):
        reading = openai_api.chat_request({**body, "response_format": bad}, {})
        assert isinstance(reading.draft, RpcError) and reading.draft.field.startswith("response_format"), bad
