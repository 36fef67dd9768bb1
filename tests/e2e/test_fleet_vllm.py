"""The fleet on two real vLLM CPU workers (the embedded model):

- placement by cached prefix: a request sharing a long prefix with an earlier one goes to the worker
  whose engine holds it (its KV events, read by our worker), where affinity and least-load would not,
  and vLLM counts the prefix as cached;
- resume after the first token (``bench.resume``'s measurement, asserted): 16 greedy streams on one
  worker, that worker killed with SIGKILL once every stream has tokens. Every stream completes on the
  other worker with text identical to an uninterrupted run, exact usage and no error; the pauses are
  printed (``pytest -s``: RESUME). Last, since it kills a worker.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from bench import kv_placement, resume
from gateway.v1 import gateway_pb2 as gpb
from tests.helpers import build_stack
from tests.integration.test_observability import delta, scrape, value

pytestmark = pytest.mark.vllm
STREAMS = 16
# `make test-native`: the streams go through the gateway's native relay.
NATIVE_RELAY = os.environ.get("IGW_TEST_NATIVE_RELAY") == "1"
EXECUTE_VIA = "relay" if NATIVE_RELAY else "gateway"


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    cfg = resume.config(tmp_path_factory.mktemp("resume-vllm-cfg"), NATIVE_RELAY)
    s = build_stack(tmp_path_factory.mktemp("resume-vllm"), cfg)
    names = {w["address"]: f"worker{i}" for i, w in enumerate(cfg["gateway"]["workers"])}
    try:
        for addr, name in names.items():
            s.start_worker(name=name, listen=addr)
        s.start_gateway()
        resume.wait_ready(s.gateway_stub("gateway"), 2)
        yield s, names
    finally:
        s.stop()


def _started(call) -> str:
    """The worker of a stream, once it has its first token."""
    worker = ""
    for ev in call:
        if ev.HasField("started"):
            worker = ev.started.worker
        if ev.HasField("delta") and ev.delta.tokens:
            return worker
    raise AssertionError("the stream ended before its first token")


def _run(stub, messages, session: str) -> tuple[str, gpb.Usage]:
    worker, usage = "", None
    req = gpb.ExecuteRequest(messages=messages, session_id=session, sampling=gpb.SamplingParams(max_tokens=4))
    for ev in stub.Execute(req, timeout=300):
        worker = ev.started.worker if ev.HasField("started") else worker
        usage = ev.done.usage if ev.HasField("done") else usage
    return worker, usage


def _blocker(session: str) -> gpb.ExecuteRequest:
    return gpb.ExecuteRequest(
        task="Count from 1 to 1000.", session_id=session, sampling=gpb.SamplingParams(max_tokens=1500, temperature=0)
    )


def test_a_shared_prefix_goes_to_the_worker_whose_engine_holds_it(two_workers):
    """Worker Y holds a long prefix (A ran there) and is busy with a short stream; X is idle. B, a new
    session sharing the prefix, goes to Y, where vLLM finds 1024+ of its tokens cached. Affinity (no
    history for B's session) and least-load would both have sent it to the idle X, which holds nothing."""
    s, _ = two_workers
    stub, metrics = s.gateway_stub(EXECUTE_VIA), s.config["gateway"]["metrics_listen"]
    before = scrape(metrics)
    system = gpb.ChatMessage(role="system", content=kv_placement.system_prompt("fleet-test", 1100))

    def ask(q):
        return [system, gpb.ChatMessage(role="user", content=q)]

    blocker1 = stub.Execute(_blocker("blk1"), timeout=300)
    x = _started(blocker1)
    y, usage_a = _run(stub, ask("What is this team's first convention?"), "a")  # X is busy: least load
    assert y != x and usage_a.prompt_tokens > 1024
    blocker1.cancel()
    deadline = time.monotonic() + 10
    while value(scrape(metrics), "igw_worker_cached_blocks", worker=y) < usage_a.prompt_tokens // 128:
        assert time.monotonic() < deadline, "the gateway never learned the blocks worker Y's engine stored"
        time.sleep(0.1)
    blocker2 = stub.Execute(_blocker("a"), timeout=300)  # session a's affinity: Y
    assert _started(blocker2) == y
    try:
        worker_b, usage_b = _run(stub, ask("And the second one?"), "b")
        assert worker_b == y, "placed by cached prefix, B should go where its prefix is, busy or not"
        assert usage_b.cached_prompt_tokens >= 1024  # vLLM's own count: the prefix was reused
        assert delta(before, scrape(metrics), "igw_placements_total", strategy="kv_cache") >= 1

    finally:
        blocker2.cancel()


def test_kill9_of_a_vllm_worker_mid_stream_loses_no_token(two_workers):
    s, names = two_workers
    metrics = s.config["gateway"]["metrics_listen"]
    before = scrape(metrics)
    figures = resume.measure(s, s.gateway_stub(EXECUTE_VIA), names, STREAMS, 48)
    baseline, resumed = figures.pop("_runs")
    print("\nRESUME", json.dumps(figures))
    assert figures["killed_mid_stream"]
    assert [r["error"] for r in resumed] == [None] * STREAMS
    for b, r in zip(baseline, resumed, strict=True):
        assert r["text"] == b["text"], (b["text"], r["text"])
        assert r["usage"] == b["usage"] and r["tokens"] == r["usage"][1]  # usage counted once
    assert delta(before, scrape(metrics), "igw_resumes_total") == STREAMS
