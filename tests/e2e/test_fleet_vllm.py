"""Resume after the first token on real vLLM (``bench.resume``'s measurement, asserted): two vLLM CPU
workers (the embedded model), 16 greedy streams on one of them, that worker killed with SIGKILL once
every stream has tokens. Every stream completes on the other worker with text identical to an
uninterrupted run of the same requests, exact usage and no error; the pauses are printed
(``pytest -s``: RESUME)."""

from __future__ import annotations

import json

import pytest

from bench import resume
from tests.helpers import build_stack
from tests.integration.test_observability import delta, scrape

pytestmark = pytest.mark.vllm
STREAMS = 16


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    cfg = resume.config(tmp_path_factory.mktemp("resume-vllm-cfg"))
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


def test_kill9_of_a_vllm_worker_mid_stream_loses_no_token(two_workers):
    s, names = two_workers
    metrics = s.config["gateway"]["metrics_listen"]
    before = scrape(metrics)
    figures = resume.measure(s, s.gateway_stub("gateway"), names, STREAMS, 48)
    baseline, resumed = figures.pop("_runs")
    print("\nRESUME", json.dumps(figures))
    assert figures["killed_mid_stream"]
    assert [r["error"] for r in resumed] == [None] * STREAMS
    for b, r in zip(baseline, resumed, strict=True):
        assert r["text"] == b["text"], (b["text"], r["text"])
        assert r["usage"] == b["usage"] and r["tokens"] == r["usage"][1]  # usage counted once
    assert delta(before, scrape(metrics), "igw_resumes_total") == STREAMS
