"""The adversarial suite (tests/adversarial.py) against an ``openai-http`` pool member: the same hostile
requests and canary stream as tests/integration/test_adversarial.py, with the synthetic standin
(``igw_stack.openai_http_standin``) as the only worker, as many cases.

Asserted for every call as there; at the end: every canary stream exact, no quota lease in use, no stream
left open on the member, every process alive, the member still serving."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from hypothesis import given, settings

from gateway.v1 import gateway_pb2 as gpb
from tests.adversarial import (
    MODEL,
    SETTINGS,
    CanaryLoop,
    after_the_storm,
    credentials,
    hostile_case,
    hostile_keys,
    requests,
    timeouts,
)
from tests.helpers import build_stack, free_port, make_config, wait_ready_workers


def open_streams(addr: str) -> int:
    with urllib.request.urlopen(f"http://{addr}/load", timeout=5) as r:
        return json.loads(r.read())["open_streams"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adversarial-members")
    keys, member = tmp / "keys.yaml", f"127.0.0.1:{free_port()}"
    cfg = make_config(
        "synthetic",
        gateway={
            "workers": [{"protocol": "openai-http", "address": f"http://{member}/v1", "max_concurrent_requests": 32}],
            "auth": {"mode": "api_key", "key_file": str(keys)},
            "limits": {"default_max_tokens": 8},
            "queue": {"max_queued": 64},
        },
    )
    key = hostile_keys(keys)
    s = build_stack(tmp, cfg)
    s.start_openai_standin("standin", member, "--tokens-per-s", "3000", "--model", MODEL)
    s.start_gateway()
    s.start_envoy()
    stub = s.gateway_stub("envoy")
    wait_ready_workers(stub, 1, key=key)
    canary = CanaryLoop(stub, key)
    state = {"stack": s, "stub": stub, "key": key, "canary": canary, "member": member, "calls": 0, "codes": {}}
    yield state
    canary.stop()
    s.stop()


@settings(**SETTINGS)
@given(request=requests(), cred=credentials, timeout=timeouts)
def test_hostile_requests_through_an_openai_http_member_hurt_nobody(hostile, request, cred, timeout):
    hostile_case(hostile, request, cred, timeout)


def test_after_the_storm_the_member_holds_nothing(hostile):
    s, stub = hostile["stack"], hostile["stub"]
    md = after_the_storm(hostile)
    deadline = time.monotonic() + 5
    while open_streams(hostile["member"]):
        assert time.monotonic() < deadline, "a stream is still open on the member for a caller that is gone"
        time.sleep(0.05)
    assert s.exited() is None, f"{s.exited()} died"
    req = gpb.ExecuteRequest(task="after", sampling=gpb.SamplingParams(max_tokens=5))
    assert list(stub.Execute(req, metadata=md, timeout=30))[-1].done.usage.completion_tokens == 5
