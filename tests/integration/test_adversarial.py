"""The adversarial suite: hostile and careless requests through Envoy, with a canary stream beside them.

Property-based (hypothesis): requests with every field at, around and far
beyond its limit, odd Unicode, NaN/Inf and deep or wide ``context``,
duplicate request ids (the canary's own), bad enum values, extreme deadlines,
bad credentials, and bodies protobuf cannot decode. Meanwhile a canary runs
streams of known length back to back on the same worker session.

Asserted for every call: it answers (no hang: a call with a long deadline
never ends in DEADLINE_EXCEEDED), never with INTERNAL or UNKNOWN, with a
bounded message, and a successful stream is started -> deltas -> done with
the token count it announces. Asserted at the end: every canary stream was
exact, no quota lease is left in use, the engine holds no request, every
process is alive.

``IGW_ADVERSARIAL_EXAMPLES`` sets the number of cases (default 2,000, the
short form in ``make test``); ``IGW_ADVERSARIAL_RANDOM=1`` draws new ones
instead of the reproducible default sequence.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.v1 import gateway_pb2 as gpb
from tests.adversarial import (
    ALLOWED,
    EXAMPLES,
    LONG,
    MODEL,
    SETTINGS,
    CanaryLoop,
    after_the_storm,
    credentials,
    hostile_case,
    hostile_keys,
    metadata_for,
    requests,
    timeouts,
)
from tests.helpers import build_stack, make_config


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adversarial")
    keys = tmp / "keys.yaml"
    cfg = make_config(
        "synthetic",
        worker={
            "model_name": MODEL,
            "max_concurrent_requests": 32,
            "synthetic": {"tokens_per_s": 3000, "max_context_tokens": 4096},
        },
        gateway={
            "auth": {"mode": "api_key", "key_file": str(keys)},
            "limits": {"default_max_tokens": 8},
            "queue": {"max_queued": 64},
        },
    )
    key = hostile_keys(keys)
    s = build_stack(tmp, cfg)
    s.start_worker()
    s.start_gateway()
    s.start_envoy()
    stub = s.gateway_stub("envoy")
    canary = CanaryLoop(stub, key)
    state = {"stack": s, "stub": stub, "key": key, "canary": canary, "calls": 0, "codes": {}}
    yield state
    canary.stop()
    s.stop()


@settings(**SETTINGS)
@given(request=requests(), cred=credentials, timeout=timeouts)
def test_hostile_requests_hurt_nobody(hostile, request, cred, timeout):
    hostile_case(hostile, request, cred, timeout)


@settings(**{**SETTINGS, "max_examples": max(50, EXAMPLES // 10)})
@given(
    body=st.one_of(
        st.binary(max_size=300),
        requests()
        .map(lambda r: r.SerializeToString())
        .flatmap(lambda b: st.tuples(st.just(b), st.integers(0, max(0, len(b) - 1)), st.integers(0, 255)))
        .map(lambda t: t[0][: t[1]] + bytes([t[2]]) + t[0][t[1] + 1 :] if t[0] else b""),
    )
)
def test_undecodable_and_mutated_bodies(hostile, body):
    with grpc.insecure_channel(hostile["stack"].envoy) as ch:
        call = ch.unary_stream(
            "/gateway.v1.Gateway/Execute",
            request_serializer=lambda b: b,
            response_deserializer=gpb.ExecuteResponse.FromString,
        )
        md = metadata_for("good", hostile["key"])
        try:
            list(call(body, metadata=md, timeout=LONG))
            code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            code = err.code()
            assert len(err.details() or "") < 2_000
    assert code in ALLOWED, code.name
    hostile["calls"] += 1


def test_after_the_storm_nothing_leaked(hostile):
    s, stub = hostile["stack"], hostile["stub"]
    md = after_the_storm(hostile)
    load, _ = s.wait_worker_idle(5)
    assert load.active_requests == 0 and load.engine_unfinished_requests == 0
    assert s.exited() is None, f"{s.exited()} died"
    # Still serving normally.
    out = list(
        stub.Execute(
            gpb.ExecuteRequest(task="after", sampling=gpb.SamplingParams(max_tokens=5)), metadata=md, timeout=30
        )
    )
    assert out[-1].done.usage.completion_tokens == 5
