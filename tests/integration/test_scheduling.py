"""Under load and faults (real processes, synthetic engine): queueing, fairness, priority,
deadlines and cancels while queued, affinity, failover, ejection, drain."""

from __future__ import annotations

import contextlib
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from gateway.v1 import gateway_pb2 as gpb
from tests.helpers import build_stack, free_port, igw_keys, make_config, set_replicas, wait_ready_workers
from tests.integration.test_observability import delta, scrape


def req(max_tokens=10, task="go", **kw):
    return gpb.ExecuteRequest(task=task, sampling=gpb.SamplingParams(max_tokens=max_tokens), **kw)


def run(stub, request, key=None, timeout=60):
    md = [("authorization", f"Bearer {key}")] if key else None
    return list(stub.Execute(request, metadata=md, timeout=timeout))


def stack_with(tmp_path, workers=1, capacity=2, rate=20, prefill_ms=0, **gateway):
    cfg = make_config(
        "synthetic",
        gateway=gateway,
        worker={
            "synthetic": {"tokens_per_s": rate, "first_token_delay_ms": prefill_ms},
            "max_concurrent_requests": capacity,
        },
    )
    addrs = [cfg["worker"]["listen"]] + [f"127.0.0.1:{free_port()}" for _ in range(workers - 1)]
    cfg["gateway"]["workers"] = [{"address": a} for a in addrs]
    s = build_stack(tmp_path, cfg)
    for i, a in enumerate(addrs):
        s.start_worker(name=f"worker{i}", listen=a)
    return s, addrs


@contextlib.contextmanager
def gateway_over(tmp_path, workers=1, key=None, **kw):
    """Workers + one gateway, ready; yields (stack, gateway stub, worker addresses)."""
    s, addrs = stack_with(tmp_path, workers=workers, **kw)
    try:
        s.start_gateway()
        stub = s.gateway_stub("gateway")
        wait_ready_workers(stub, workers, key=key)
        yield s, stub, addrs
    finally:
        s.stop()


def test_overload_queue_full_is_immediate_and_admitted_complete(tmp_path):
    with gateway_over(tmp_path, capacity=2, rate=20, queue={"max_queued": 3}) as (s, stub, addrs):
        with ThreadPoolExecutor(5) as ex:
            admitted = [ex.submit(run, stub, req(20)) for _ in range(5)]  # 2 running + 3 queued
            time.sleep(0.5)
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                run(stub, req(1))
            assert time.monotonic() - t0 < 0.5
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in info.value.details()
            assert dict(info.value.trailing_metadata())["retry-after"] == "1"
            for f in admitted:
                assert f.result()[-1].done.usage.completion_tokens == 20
        assert s.worker_load(s.worker).requests_total == 5


def test_fairness_flood_versus_trickle(tmp_path):
    keys = tmp_path / "keys.yaml"
    flood = igw_keys("issue", "--file", str(keys), "--tenant", "flood")
    trickle = igw_keys("issue", "--file", str(keys), "--tenant", "trickle")
    # Capacity 2, each request 10 tokens at 40 tokens/s = 0.25 s of service.
    with gateway_over(
        tmp_path,
        capacity=2,
        rate=40,
        key=flood,
        auth={"mode": "api_key", "key_file": str(keys)},
        queue={"max_queued": 500, "drr_quantum_tokens": 64},
    ) as (s, stub, addrs):
        waits = {"flood": [], "trickle": []}
        with ThreadPoolExecutor(48) as ex:
            floods = [ex.submit(run, stub, req(10), flood) for _ in range(40)]
            time.sleep(0.3)  # the flood is queued
            trickles = []
            for _ in range(6):
                trickles.append(ex.submit(run, stub, req(10), trickle))
                time.sleep(0.3)
            for f in floods:
                waits["flood"].append(f.result()[-1].done.timings.queue_ms)
            for f in trickles:
                waits["trickle"].append(f.result()[-1].done.timings.queue_ms)
        for tenant, w in waits.items():
            w.sort()
            print(
                f"queue wait {tenant}: p50 {statistics.median(w):.0f} ms, p99 {w[int(0.99 * (len(w) - 1))]:.0f} ms, "
                f"max {w[-1]:.0f} ms over {len(w)} requests"
            )
        # Bound: a trickle request waits for at most one DRR round, i.e. the running requests and one
        # flood request ahead of it: about 2 service times (0.5 s) plus scheduling slack.
        assert max(waits["trickle"]) < 800
        assert statistics.median(waits["flood"]) > 2 * max(waits["trickle"])


def test_interactive_overtakes_queued_batch(tmp_path):
    with gateway_over(tmp_path, capacity=1, rate=40) as (s, stub, addrs):
        finished: list[str] = []
        lock = threading.Lock()

        def one(name, prio):
            run(stub, req(40, priority=prio))  # 1 s each
            with lock:
                finished.append(name)

        with ThreadPoolExecutor(8) as ex:
            fs = [ex.submit(one, f"batch{i}", gpb.PRIORITY_BATCH) for i in range(5)]
            time.sleep(0.3)
            fs.append(ex.submit(one, "interactive", gpb.PRIORITY_INTERACTIVE))
            for f in fs:
                f.result()
        # batch0 was already running; the interactive one goes next, ahead of 4 queued batch requests.
        assert finished.index("interactive") <= 1, finished


def test_batch_only_key_cannot_ask_for_interactive(tmp_path):
    keys = tmp_path / "keys.yaml"
    key = igw_keys("issue", "--file", str(keys), "--tenant", "t", "--priority-max", "batch")
    with gateway_over(tmp_path, key=key, auth={"mode": "api_key", "key_file": str(keys)}) as (s, stub, addrs):
        with pytest.raises(grpc.RpcError) as info:
            run(stub, req(1, priority=gpb.PRIORITY_INTERACTIVE), key)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and info.value.details().startswith("priority:")
        assert run(stub, req(1), key)[-1].done.usage.completion_tokens == 1  # unset = its cap


def test_deadline_and_cancel_while_queued_never_reach_the_engine(tmp_path):
    with gateway_over(tmp_path, capacity=1, rate=20) as (s, stub, addrs):
        blocker = stub.Execute(req(60), timeout=30)  # occupies the only slot for 3 s
        next(iter(blocker))
        before = s.worker_load(s.worker).requests_total
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            run(stub, req(5), timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 1.5
        queued = stub.Execute(req(5), timeout=30)
        time.sleep(0.3)
        queued.cancel()
        time.sleep(0.2)
        blocker.cancel()
        time.sleep(0.3)
        # Neither queued request was ever submitted to the worker.
        assert s.worker_load(s.worker).requests_total == before
        assert run(stub, req(2))[-1].done.usage.completion_tokens == 2  # and the queue is clean


def test_session_affinity(tmp_path):
    with gateway_over(tmp_path, workers=2, capacity=8, rate=40) as (s, stub, addrs):
        hold = stub.Execute(req(200, task="hold one"), timeout=30)  # loads the first worker
        w_hold = next(iter(hold)).started.worker
        first = run(stub, req(2, session_id="s1"))[0].started.worker
        assert first != w_hold  # least loaded
        hold.cancel()
        time.sleep(0.2)
        # Now load s1's worker; affinity keeps s1 there although the other worker is idle.
        hold2 = stub.Execute(req(200, task="hold two", session_id="s1"), timeout=30)
        assert next(iter(hold2)).started.worker == first
        workers = {run(stub, req(2, session_id="s1"))[0].started.worker for _ in range(5)}
        assert workers == {first}
        other = run(stub, req(2, session_id="s2"))[0].started.worker
        assert other != first  # a new session goes to the least loaded
        hold2.cancel()


def test_kill9_worker_under_load_loses_no_stream(tmp_path):
    """Streams with tokens continue on the other worker from those tokens (resume); those with none yet are
    placed again (retry). Every one completes with the whole text, exact usage, and a pause."""
    # 1 s of simulated prefill, so some streams have no token yet when the worker dies.
    with gateway_over(tmp_path, workers=2, capacity=16, rate=20, prefill_ms=1000) as (s, stub, addrs):
        results, lock = [], threading.Lock()
        metrics = s.config["gateway"]["metrics_listen"]
        before = scrape(metrics)

        def one(i):
            text, got, gaps, last = "", 0, [], None
            try:
                for r in stub.Execute(req(60, task=f"t{i}"), timeout=60):
                    now = time.monotonic()
                    if r.WhichOneof("event") == "delta":
                        got += r.delta.tokens
                        text += r.delta.text
                        if last is not None:
                            gaps.append(now - last)
                        last = now
                    if r.WhichOneof("event") == "done":
                        out = ("done", got, r.done.usage.completion_tokens, text, max(gaps, default=0))
            except grpc.RpcError as err:
                out = (err.code().name, got, err.details())
            with lock:
                results.append(out)

        with ThreadPoolExecutor(16) as ex:
            fs = [ex.submit(one, i) for i in range(8)]
            time.sleep(1.6)  # the first 8 stream tokens
            fs += [ex.submit(one, i) for i in range(8, 16)]
            time.sleep(0.3)  # these 8 are accepted but still in prefill
            t_kill = time.monotonic()
            s.procs["worker0"].send_signal(signal.SIGKILL)
            wait_ready_workers(stub, 1)
            ejected_after = time.monotonic() - t_kill
            for f in fs:
                f.result(timeout=60)
        print(f"kill -9 to ejection: {ejected_after * 1000:.0f} ms")
        assert ejected_after < 1.0
        assert len(results) == 16 and all(r[0] == "done" for r in results), [r for r in results if r[0] != "done"]
        # The synthetic engine's text is known: 60 words of its cycle, none twice, none missing.
        words = "lorem ipsum dolor sit amet".split()
        whole = "".join(words[i % 5] + " " for i in range(60))
        for r in results:
            assert r[1] == r[2] == 60 and r[3] == whole, r
        log = s.log("gateway").read_text()
        resumed = log.count("resuming on another worker")
        retried = log.count("failed before the first token; retrying elsewhere")
        after = scrape(metrics)
        assert resumed >= 1 and retried >= 1 and delta(before, after, "igw_resumes_total") == resumed
        pauses = sorted(r[4] for r in results)
        print(f"resumed {resumed}, retried {retried}; longest pause per stream (s): {[round(p, 2) for p in pauses]}")
        s.procs.pop("worker0").wait()
        s.start_worker(name="worker0", listen=addrs[0])
        wait_ready_workers(stub, 2, timeout=15)  # rejoined


def test_a_stream_outliving_its_workers_drain_is_resumed_elsewhere(tmp_path):
    """A worker told to stop (SIGTERM) lets its streams run for its grace (drain_grace_s, 5 s here); one
    still running when the grace ends goes on on the other worker from its tokens: no error, no token lost."""
    with gateway_over(tmp_path, workers=2, capacity=4, rate=20) as (s, stub, addrs):
        call = stub.Execute(req(200, task="long"), timeout=60)  # 10 s at 20 tokens/s
        first = next(call)
        victim = f"worker{addrs.index(first.started.worker)}"
        text, tokens = "", 0
        for ev in call:
            text += ev.delta.text
            tokens += ev.delta.tokens
            if tokens >= 5:
                break
        s.procs[victim].send_signal(signal.SIGTERM)
        rest = list(call)
        text += "".join(ev.delta.text for ev in rest if ev.HasField("delta"))
        assert rest[-1].done.usage.completion_tokens == 200
        assert text == "".join("lorem ipsum dolor sit amet ".split(" ")[i % 5] + " " for i in range(200))
        assert s.procs[victim].wait(10) == 0
        assert "resuming on another worker" in s.log("gateway").read_text()


def test_sigterm_gateway_behind_envoy_loses_no_stream(tmp_path):
    cfg = make_config(
        "synthetic",
        worker={"synthetic": {"tokens_per_s": 40}},
        gateway={"drain_notice_s": 2.5, "drain_grace_s": 20},
        envoy={"health_check_interval_ms": 500},
    )
    g2 = f"127.0.0.1:{free_port()}"
    set_replicas(cfg, [cfg["gateway"]["listen"], g2])
    s = build_stack(tmp_path, cfg)
    try:
        s.start_worker()
        s.start_gateway("gateway0", cfg["gateway"]["listen"])
        s.start_gateway("gateway1", g2)
        s.start_envoy()
        stub = s.gateway_stub("envoy")
        stop = threading.Event()
        outcomes, lock = [], threading.Lock()

        def client():
            while not stop.is_set():
                try:
                    done = run(stub, req(20))[-1].done  # 0.5 s streams
                    out = "ok" if done.usage.completion_tokens == 20 else "short"
                except grpc.RpcError as err:
                    out = f"{err.code().name}: {err.details()}"
                with lock:
                    outcomes.append(out)

        with ThreadPoolExecutor(6) as ex:
            fs = [ex.submit(client) for _ in range(6)]
            time.sleep(2)
            s.procs["gateway0"].send_signal(signal.SIGTERM)
            time.sleep(5)
            # The drained replica is gone; calls keep succeeding on the other one.
            assert s.procs["gateway0"].wait(30) == 0
            n_before = len(outcomes)
            time.sleep(2)
            stop.set()
            for f in fs:
                f.result()
        assert len(outcomes) - n_before >= 6
        assert set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:5]
    finally:
        s.stop()


def test_workers_found_by_dns(tmp_path):
    port = free_port()
    cfg = make_config(
        "synthetic",
        worker={"listen": f"127.0.0.1:{port}"},
        gateway={"worker_dns": [f"localhost:{port}"], "worker_dns_refresh_s": 0.5},
    )
    s = build_stack(tmp_path, cfg)
    try:
        s.start_worker()
        s.start_gateway()
        stub = s.gateway_stub("gateway")
        wait_ready_workers(stub, 1)  # localhost may also resolve to ::1, where nothing listens
        assert run(stub, req(2))[-1].done.usage.completion_tokens == 2
    finally:
        s.stop()


def test_agents_session_headers_and_ids_are_affinity_keys(tmp_path):
    """Claude Code's session header, Codex's, and a Responses body's prompt_cache_key keep an agent's turns
    on one worker (its prefix cache), as x-igw-session-id does, without a server-side session."""
    import json
    import urllib.request

    with gateway_over(tmp_path, workers=2, capacity=8, rate=40) as (s, stub, addrs):
        http = s.config["gateway"]["http_listen"]

        def post(path, body, headers):
            request = urllib.request.Request(
                f"http://{http}{path}",
                data=json.dumps(body).encode(),
                headers={"content-type": "application/json", **headers},
            )
            with urllib.request.urlopen(request, timeout=30) as resp:
                return resp.headers, json.loads(resp.read())

        def ask(path, headers, extra, text, max_tokens=2):
            if path == "/v1/messages":
                body = {"max_tokens": max_tokens, "messages": [{"role": "user", "content": text}], **extra}
            else:
                body = {"input": text, "max_output_tokens": max_tokens, **extra}
            post(path, body, headers)

        def served_by(*args):
            """The workers that served ``ask(*args)``."""
            before = {a: s.worker_load(a).requests_total for a in addrs}
            ask(*args)
            return [a for a in addrs if s.worker_load(a).requests_total > before[a]]

        for path, headers, extra in (
            ("/v1/messages", {"x-claude-code-session-id": "3f1c-agent-a"}, {}),
            ("/v1/responses", {"session_id": "codex-agent-b"}, {}),
            ("/v1/responses", {}, {"prompt_cache_key": "codex-agent-c"}),
        ):
            (home,) = served_by(path, headers, extra, "turn one")
            # A long turn of the same agent keeps its worker busy; the other worker is idle.
            hold = threading.Thread(target=ask, args=(path, headers, extra, "a long turn", 200))
            hold.start()
            time.sleep(0.5)
            for turn in ("turn two, a longer history", "turn three, longer still"):
                assert served_by(path, headers, extra, turn) == [home], (headers, extra)
            hold.join(30)
