"""Structured output through both doors on the synthetic engine: the gateway's own part (bounds, field
names, what reaches the worker, a hostile schema beside a running stream). That the engine enforces a
constraint is shown on real vLLM in tests/e2e/test_structured_vllm.py."""

from __future__ import annotations

import json
import threading

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gateway.v1 import gateway_pb2 as gpb
from tests.integration.test_http_api import raw


def _field(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)
    for d in status.details:
        bad = error_details_pb2.BadRequest()
        if d.Unpack(bad):
            return bad.field_violations[0].field
    return ""


class Canary:
    """A 60-token Execute stream running beside a test's hostile requests: ``tokens()`` waits for it."""

    def __init__(self, stub, max_tokens: int = 60):
        self.got = None

        def run():
            req = gpb.ExecuteRequest(task="canary", sampling=gpb.SamplingParams(max_tokens=max_tokens))
            self.got = sum(r.delta.tokens for r in stub.Execute(req, timeout=60) if r.HasField("delta"))

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def tokens(self) -> int | None:
        self.thread.join(60)
        return self.got


def _execute(stub, **constraint):
    req = gpb.ExecuteRequest(task="pick one", constraint=gpb.OutputConstraint(**constraint))
    return list(stub.Execute(req, timeout=30))


def test_execute_carries_each_kind_to_the_worker(synthetic_stack):
    stub = synthetic_stack.gateway_stub()
    out = _execute(stub, choice=gpb.ChoiceList(choices=["yes", "no"]))
    assert "".join(r.delta.text for r in out if r.HasField("delta")) == "yes"
    assert out[-1].done.finish_reason == gpb.FINISH_REASON_STOP
    out = _execute(stub, json_object=True)
    assert json.loads("".join(r.delta.text for r in out if r.HasField("delta"))) == {}
    # The synthetic engine cannot enforce a schema or a regex: it says so, naming the field.
    for kind, value in (("json_schema", '{"type": "object"}'), ("regex", "[a-z]+")):
        with pytest.raises(grpc.RpcError) as info:
            _execute(stub, **{kind: value})
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _field(info.value) == f"constraint.{kind}"


def test_hostile_schemas_are_refused_by_the_gateway_beside_a_running_stream(synthetic_stack):
    stub = synthetic_stack.gateway_stub()
    canary = Canary(stub)
    deep = '{"a":' * 5000 + "1" + "}" * 5000
    huge = json.dumps({"type": "object", "description": "x" * 70_000})
    cases = [
        (dict(json_schema=deep), "constraint.json_schema"),
        (dict(json_schema=huge), "constraint.json_schema"),
        (dict(json_schema="[1]"), "constraint.json_schema"),
        (dict(json_schema='{"a": NaN}'), "constraint.json_schema"),
        (dict(regex="x" * 5000), "constraint.regex"),
        (dict(choice=gpb.ChoiceList(choices=[str(i) for i in range(1000)])), "constraint.choice"),
        (dict(choice=gpb.ChoiceList(choices=["ok", ""])), "constraint.choice[1]"),
    ]
    for constraint, field in cases:
        with pytest.raises(grpc.RpcError) as info:
            _execute(stub, **constraint)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert _field(info.value) == field
        assert len(info.value.details()) < 300  # nothing the client sent is echoed back at length
    # The HTTP door names its own fields.
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "deep", "schema": json.loads('{"a":' * 600 + "1" + "}" * 600)},
        },
    }
    status, _, out = raw(synthetic_stack, "POST", "/v1/chat/completions", body)
    err = json.loads(out)["error"]
    assert status == 400 and err["param"] == "response_format.json_schema.schema", err
    body["response_format"] = {"type": "grammar", "grammar": "x"}
    status, _, out = raw(synthetic_stack, "POST", "/v1/chat/completions", body)
    assert status == 400 and json.loads(out)["error"]["param"] == "response_format"
    assert canary.tokens() == 60


def test_the_http_door_answers_json_object(synthetic_stack):
    body = {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}
    status, _, out = raw(synthetic_stack, "POST", "/v1/chat/completions", body)
    assert status == 200, out
    answer = json.loads(out)["choices"][0]
    assert json.loads(answer["message"]["content"]) == {} and answer["finish_reason"] == "stop"
