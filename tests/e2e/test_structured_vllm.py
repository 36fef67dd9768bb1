"""Structured output enforced by vLLM's constrained decoding, through Envoy on the embedded model: the
`openai` package's response_format, Execute's constraint from a client generated from protos/, and a
stock vLLM gRPC server as the only pool member (the constraint in its own SamplingParams)."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import openai
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gateway.v1 import gateway_pb2 as gpb
from tests.helpers import build_stack, make_config

pytestmark = pytest.mark.vllm
MODEL = "smollm2-135m-instruct"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "languages": {"type": "array", "items": {"enum": ["python", "rust", "go"]}, "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}
UNCOMPILABLE = {"type": "object", "properties": {"a": {"type": "strnig"}}}


@pytest.fixture(scope="module")
def oai(vllm_stack):
    return openai.OpenAI(base_url=f"http://{vllm_stack.envoy}/v1", api_key="unused", max_retries=0, timeout=300)


def _field(err: grpc.RpcError) -> str:
    for d in rpc_status.from_call(err).details:
        bad = error_details_pb2.BadRequest()
        if d.Unpack(bad):
            return bad.field_violations[0].field
    return ""


def _text(out) -> str:
    return "".join(r.delta.text for r in out if r.HasField("delta"))


def test_json_schema_answers_validate_in_20_of_20_draws_at_temperature_1(oai):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def draw(i):
        return oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Invent programmer number {i}."}],
            response_format=fmt,
            temperature=1.0,
            max_tokens=96,
        ).choices[0]

    with ThreadPoolExecutor(10) as ex:  # vLLM batches them
        choices = list(ex.map(draw, range(20)))
    for c in choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), PERSON)


def test_a_schema_the_engine_cannot_compile_is_a_400_and_the_worker_serves_on(oai):
    canary = {}

    def stream():
        chunks = oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Count to 30."}],
            max_tokens=30,
            temperature=0,
            stream=True,
        )
        canary["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]

    t = threading.Thread(target=stream)
    t.start()
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": UNCOMPILABLE}},
            max_tokens=8,
        )
    err = info.value.body
    assert err["param"] == "response_format.json_schema.schema" and "cannot compile" in err["message"], err
    t.join(300)
    assert canary["finish"] in (["length"], ["stop"])
    whole = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": 'Reply with a JSON object: {"colour": "<a colour>"}'}],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0,
    ).choices[0]
    assert whole.finish_reason == "stop" and isinstance(json.loads(whole.message.content), dict), whole


def test_execute_choice_regex_and_a_regex_the_engine_cannot_compile(vllm_stack):
    stub = vllm_stack.gateway_stub()

    def run(task, **constraint):
        req = gpb.ExecuteRequest(
            task=task,
            constraint=gpb.OutputConstraint(**constraint),
            sampling=gpb.SamplingParams(max_tokens=16, temperature=1.0),
        )
        return list(stub.Execute(req, timeout=300))

    out = run("Is Python a programming language?", choice=gpb.ChoiceList(choices=["yes", "no", "maybe"]))
    assert _text(out) in ("yes", "no", "maybe") and out[-1].done.finish_reason == gpb.FINISH_REASON_STOP
    out = run("Give a phone number.", regex=r"[0-9]{3}-[0-9]{4}")
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", _text(out)), _text(out)
    with pytest.raises(grpc.RpcError) as info:
        run("x", regex="((")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and _field(info.value) == "constraint.regex"
    assert vllm_stack.wait_worker_idle(10)[0].engine_unfinished_requests == 0


@pytest.fixture(scope="module")
def stock_only(stock_vllm_grpc, tmp_path_factory):
    """A gateway whose one pool member is the stock vLLM gRPC server (shared with the other stock tests)."""
    cfg = make_config("vllm")
    cfg["gateway"]["workers"] = [{"address": stock_vllm_grpc.worker, "protocol": "vllm-grpc"}]
    s = build_stack(tmp_path_factory.mktemp("stock-only"), cfg)
    try:
        s.start_gateway()
        s.start_envoy()
        yield s.gateway_stub()
    finally:
        s.stop()


def test_a_stock_vllm_grpc_member_enforces_the_constraint(stock_only):
    req = gpb.ExecuteRequest(
        task="Invent a programmer.",
        constraint=gpb.OutputConstraint(json_schema=json.dumps(PERSON)),
        sampling=gpb.SamplingParams(max_tokens=256, temperature=0.0),
    )
    out = list(stock_only.Execute(req, timeout=300))
    assert out[-1].done.finish_reason == gpb.FINISH_REASON_STOP, _text(out)
    jsonschema.validate(json.loads(_text(out)), PERSON)
    req.constraint.json_schema = json.dumps(UNCOMPILABLE)
    with pytest.raises(grpc.RpcError) as info:
        list(stock_only.Execute(req, timeout=300))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _field(info.value) == "constraint.json_schema", info.value.details()
