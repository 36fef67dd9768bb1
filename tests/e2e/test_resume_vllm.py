"""Resume after the first token on real vLLM: two vLLM CPU workers (the embedded model), 16 greedy
streams on one of them, that worker killed with SIGKILL mid-way. Every stream completes on the other
worker with text identical to an uninterrupted run of the same requests, exact usage and no error;
the pause each client saw is printed (``pytest -s``: RESUME)."""

from __future__ import annotations

import json
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from gateway.v1 import gateway_pb2 as gpb
from tests.helpers import build_stack, free_port, make_config
from tests.integration.test_observability import delta, scrape
from tests.integration.test_scheduling import wait_ready_workers

pytestmark = pytest.mark.vllm
STREAMS, MAX_TOKENS = 16, 48
TOPICS = "a lighthouse,a robot,the sea,a library,a fox,winter,a train,a garden,a bridge,the moon,a clock,a river,a city,a violin,a desert,a kite"


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    cfg = make_config(
        "vllm",
        # float32: the continuation's prefill and the uninterrupted run's decode steps agree to the argmax.
        worker={"vllm": {"engine_args": {"dtype": "float32"}}},
    )
    addrs = [cfg["worker"]["listen"], f"127.0.0.1:{free_port()}"]
    cfg["gateway"]["workers"] = [{"address": a} for a in addrs]
    s = build_stack(tmp_path_factory.mktemp("resume-vllm"), cfg)
    try:
        for i, a in enumerate(addrs):
            s.start_worker(name=f"worker{i}", listen=a)
        s.start_gateway()
        wait_ready_workers(s.gateway_stub("gateway"), 2, timeout=60)
        yield s, addrs
    finally:
        s.stop()


def _request(i: int) -> gpb.ExecuteRequest:
    # One session id (sessions are off: only worker affinity), so all sixteen run on one worker.
    return gpb.ExecuteRequest(
        task=f"Write a short story about {TOPICS.split(',')[i]}.",
        session_id="resume-test",
        sampling=gpb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
    )


def _run_all(stub, on_progress=None) -> list[dict]:
    """The sixteen streams at once; ``on_progress(tokens_per_stream)`` after every delta."""
    progress = [0] * STREAMS
    lock = threading.Lock()

    def one(i):
        out = {"text": "", "tokens": 0, "gaps": [], "worker": ""}
        last = None
        try:
            for ev in stub.Execute(_request(i), timeout=600):
                now = time.monotonic()
                if ev.HasField("started"):
                    out["worker"] = ev.started.worker
                elif ev.HasField("delta"):
                    out["text"] += ev.delta.text
                    out["tokens"] += ev.delta.tokens
                    if last is not None:
                        out["gaps"].append(now - last)
                    last = now
                    with lock:
                        progress[i] = out["tokens"]
                        if on_progress is not None:
                            on_progress(progress)
                elif ev.HasField("done"):
                    out["usage"] = (ev.done.usage.prompt_tokens, ev.done.usage.completion_tokens)
        except grpc.RpcError as err:
            out["error"] = f"{err.code().name}: {err.details()}"
        return out

    with ThreadPoolExecutor(STREAMS) as ex:
        return list(ex.map(one, range(STREAMS)))


def test_kill9_of_a_vllm_worker_mid_stream_loses_no_token(two_workers):
    s, addrs = two_workers
    stub = s.gateway_stub("gateway")
    baseline = _run_all(stub)
    assert all("error" not in r for r in baseline), baseline
    (home,) = {r["worker"] for r in baseline}  # all on one worker (affinity)
    victim = f"worker{addrs.index(home)}"
    metrics = s.config["gateway"]["metrics_listen"]
    before = scrape(metrics)
    killed = threading.Event()

    def kill_when_under_way(progress):
        # Every stream has tokens, none is done: the kill lands mid-answer for all sixteen.
        if not killed.is_set() and min(progress) >= 4:
            killed.set()
            s.procs[victim].send_signal(signal.SIGKILL)

    resumed = _run_all(stub, kill_when_under_way)
    after = scrape(metrics)
    assert killed.is_set()
    assert [r.get("error") for r in resumed] == [None] * STREAMS
    for b, r in zip(baseline, resumed, strict=True):
        assert r["text"] == b["text"] and r["tokens"] == b["tokens"] == r["usage"][1], (b["text"], r["text"])
        assert r["usage"] == b["usage"]  # usage counted once: the same prompt, every token once
    assert delta(before, after, "igw_resumes_total") == STREAMS
    pauses = [max(r["gaps"]) for r in resumed]
    figures = {
        "streams": STREAMS,
        "resumed": int(delta(before, after, "igw_resumes_total")),
        "pause_s_median": round(statistics.median(pauses), 2),
        "pause_s_max": round(max(pauses), 2),
        "baseline_gap_s_max": round(max(max(b["gaps"]) for b in baseline), 2),
    }
    print("\nRESUME", json.dumps(figures))
