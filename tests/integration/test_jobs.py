"""Durable background jobs against a real redis-server, two gateway processes and the synthetic engine:
submit/get/watch, idempotent ids, tenants, transient refusals, and the crash tests: kill -9 the gateway
running jobs (the other finishes them, none lost, none done twice) and freeze one (a zombie whose late
result is refused)."""

from __future__ import annotations

import json
import os
import signal
import time

import grpc
import pytest
import redis

from gateway.v1 import gateway_pb2 as gpb
from tests.helpers import build_stack, igw_keys, make_config, new_key
from tests.state_helpers import log_lines, md, scrape, start_replica, value

CLAIM_IDLE_MS = 1_500


def job_stack(tmp, redis_url, prefix, **jobs):
    """A synthetic worker and two gateways running jobs; ``prefix``: the stack's own job keys in Redis (stacks
    of other tests may run on the same Redis meanwhile)."""
    keys = tmp / "keys.yaml"
    igw_keys("tenant", "--file", str(keys), "unused")
    cfg = make_config(
        "synthetic",
        worker={"synthetic": {"tokens_per_s": 20}},
        gateway={
            "auth": {"mode": "api_key", "key_file": str(keys), "reload_interval_s": 0.2},
            "quota": {"store": "redis", "redis_url": redis_url},
            "jobs": {
                "enabled": True,
                "claim_idle_ms": CLAIM_IDLE_MS,
                "max_attempts": 5,
                "redis_key_prefix": prefix,
                **jobs,
            },
            "drain_grace_s": 2,
        },
    )
    s = build_stack(tmp, cfg)
    s.start_worker()
    s.start_gateway()
    other = start_replica(s, "gateway-b")
    return s, keys, other


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, redis_server):
    redis_server.flush()
    s, keys, other = job_stack(tmp_path_factory.mktemp("jobs"), redis_server.url, "igw:j:")
    yield s, keys, other
    s.stop()


def submit(stub, key, job_id="", **fields) -> gpb.Job:
    req = gpb.SubmitJobRequest(request=gpb.ExecuteRequest(**fields), job_id=job_id)
    return stub.SubmitJob(req, metadata=md(key), timeout=5)


def get_job(stub, key, job_id) -> gpb.Job:
    return stub.GetJob(gpb.GetJobRequest(job_id=job_id), metadata=md(key), timeout=5)


def wait_job(stub, key, job_id, states=(gpb.JOB_STATE_SUCCEEDED, gpb.JOB_STATE_FAILED), timeout_s=30) -> gpb.Job:
    deadline = time.monotonic() + timeout_s
    while True:
        job = get_job(stub, key, job_id)
        if job.state in states or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def job_hash(r: redis.Redis, prefix: str, tenant: str, job_id: str) -> dict:
    return {k.decode(): v for k, v in r.hgetall(f"{prefix}{{jobs}}:job:{tenant}:{job_id}").items()}


def finish_markers(r: redis.Redis, prefix: str, tenant: str, job_id: str) -> int:
    return sum(1 for _, f in r.xrange(f"{prefix}{{jobs}}:job:{tenant}:{job_id}:ev") if f.get(b"t") == b"f")


def test_submit_returns_at_once_then_watch_and_get(jobs):
    s, keys, _ = jobs
    key = new_key(keys, "t-jobs")
    stub = s.gateway_stub("gateway")
    t0 = time.monotonic()
    job = submit(stub, key, task="summarize the repo", sampling=gpb.SamplingParams(max_tokens=20))
    assert time.monotonic() - t0 < 1.0 and job.job_id and job.state == gpb.JOB_STATE_QUEUED
    events = list(stub.WatchJob(gpb.WatchJobRequest(job_id=job.job_id), metadata=md(key), timeout=30))
    statuses = [e.status for e in events if e.HasField("status")]
    text = "".join(e.delta.text for e in events if e.HasField("delta"))
    tokens = sum(e.delta.tokens for e in events if e.HasField("delta"))
    assert statuses[-1].state == gpb.JOB_STATE_SUCCEEDED
    assert gpb.JOB_STATE_RUNNING in [st.state for st in statuses]
    final = statuses[-1]
    assert final.result.text == text and tokens == final.result.done.usage.completion_tokens == 20
    assert final.attempts == 1 and final.finished_unix_ms >= final.created_unix_ms > 0
    # GetJob after the fact, from the other replica; WatchJob of a finished job is its result at once.
    again = get_job(jobs[2].stub(), key, job.job_id)
    assert again == final
    late = list(stub.WatchJob(gpb.WatchJobRequest(job_id=job.job_id), metadata=md(key), timeout=5))
    assert [e.status for e in late] == [final]
    # It ran through the request core at batch priority, with a request log line like any call.
    lines = [x for g in ("gateway", "gateway-b") for x in log_lines(s.log(g)) if x.get("door") == "job"]
    assert any(x["priority"] == "batch" and x["completion_tokens"] == 20 for x in lines)


def test_job_ids_are_idempotent_and_per_tenant(jobs):
    s, keys, other = jobs
    key, stranger = new_key(keys, "t-idem"), new_key(keys, "t-stranger")
    stub = s.gateway_stub("gateway")
    fields = {"task": "index", "sampling": gpb.SamplingParams(max_tokens=5)}
    first = submit(stub, key, "build-42", **fields)
    second = submit(other.stub(), key, "build-42", **fields)  # a client retrying on another replica
    assert second.job_id == first.job_id == "build-42" and second.created_unix_ms == first.created_unix_ms
    done = wait_job(stub, key, "build-42")
    assert done.state == gpb.JOB_STATE_SUCCEEDED and done.attempts == 1
    assert submit(stub, key, "build-42", **fields) == done  # after it finished: still the same job, not rerun
    with pytest.raises(grpc.RpcError) as err:
        submit(stub, key, "build-42", task="something else", sampling=gpb.SamplingParams(max_tokens=5))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for call in (
        lambda: get_job(stub, stranger, "build-42"),
        lambda: list(stub.WatchJob(gpb.WatchJobRequest(job_id="build-42"), metadata=md(stranger), timeout=5)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # The stranger's own job with that id is its own.
    assert submit(stub, stranger, "build-42", task="theirs", sampling=gpb.SamplingParams(max_tokens=2)).attempts == 0


@pytest.mark.parametrize(
    "fields, job_id, field",
    [
        ({"task": "x", "sampling": gpb.SamplingParams(max_tokens=0)}, "", "request.sampling.max_tokens"),
        ({"task": ""}, "", "request.task"),
        ({"task": "x"}, "bad id!", "job_id"),
        ({"task": "x", "supersede_key": "k"}, "", "request.supersede_key"),
    ],
)
def test_bad_submissions_name_the_field(jobs, fields, job_id, field):
    s, keys, _ = jobs
    key = new_key(keys, "t-bad-jobs")
    with pytest.raises(grpc.RpcError) as err:
        submit(s.gateway_stub("gateway"), key, job_id, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field)


def test_a_refused_run_is_given_back_and_rerun(jobs):
    """A run refused by a quota (here: the key's one concurrent stream is taken) goes back to the queue and
    runs again after claim_idle_ms."""
    s, keys, _ = jobs
    key = new_key(keys, "t-transient", "--concurrent", "1")
    stub = s.gateway_stub("gateway")
    hog = stub.Execute(
        gpb.ExecuteRequest(task="hold the stream", sampling=gpb.SamplingParams(max_tokens=50)),
        metadata=md(key),
        timeout=60,
    )
    next(hog)
    job = submit(stub, key, task="waits its turn", sampling=gpb.SamplingParams(max_tokens=3))
    watch = stub.WatchJob(gpb.WatchJobRequest(job_id=job.job_id), metadata=md(key), timeout=30)
    list(hog)  # 2.5 s: the job's first run(s) meet the limit meanwhile
    events = list(watch)
    states = [e.status.state for e in events if e.HasField("status")]
    assert gpb.JOB_STATE_QUEUED in states[1:] and states[-1] == gpb.JOB_STATE_SUCCEEDED
    assert events[-1].status.attempts >= 2


def _wait_all_running(r, prefix, tenant, ids, timeout_s=10):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        hashes = {i: job_hash(r, prefix, tenant, i) for i in ids}
        if all(h.get("st") == b"running" for h in hashes.values()):
            return hashes
        time.sleep(0.05)
    raise AssertionError({i: h.get("st") for i, h in hashes.items()})


def test_kill_9_the_gateway_running_jobs(tmp_path, redis_server):
    """Two replicas on one Redis; kill -9 the one running jobs mid-run: the other claims and reruns them from
    the start; every job completes exactly once, none is lost. Prints the timings (pytest -s)."""
    P = "igw:j-kill:"
    s, keys, other = job_stack(tmp_path, redis_server.url, P, concurrency=3)
    try:
        r = redis.Redis(port=redis_server.port)
        key = new_key(keys, "t-crash")
        stub = s.gateway_stub("gateway")
        ids = [
            submit(stub, key, f"crash-{i}", task=f"long job {i}", sampling=gpb.SamplingParams(max_tokens=60)).job_id
            for i in range(6)
        ]
        hashes = _wait_all_running(r, P, "t-crash", ids)
        time.sleep(1.0)  # mid-run: ~20 of 60 tokens generated
        victim_addr = other.listen
        on_victim = [i for i, h in hashes.items() if h["owner"].decode().startswith(victim_addr)]
        assert on_victim and len(on_victim) < len(ids), {i: h["owner"] for i, h in hashes.items()}
        killed_at = time.time()
        os.kill(s.procs["gateway-b"].pid, signal.SIGKILL)
        s.procs["gateway-b"].wait(5)
        survivor = s.gateway_stub("gateway")
        done = {i: wait_job(survivor, key, i, timeout_s=30) for i in ids}
        assert all(j.state == gpb.JOB_STATE_SUCCEEDED for j in done.values()), done
        assert all(
            j.result.done.usage.completion_tokens == 60 and len(j.result.text.split()) == 60 for j in done.values()
        )
        # Reruns only for the killed replica's jobs, from the start (60 tokens, not the ~40 left).
        assert {i for i, j in done.items() if j.attempts == 2} == set(on_victim)
        assert all(j.attempts == 1 for i, j in done.items() if i not in on_victim)
        # Done exactly once: one finish marker each, queue empty, nothing pending.
        assert all(finish_markers(r, P, "t-crash", i) == 1 for i in ids)
        assert r.xlen(P + "{jobs}:queue") == 0 and r.xpending(P + "{jobs}:queue", "igw")["pending"] == 0
        recovered = max(done[i].finished_unix_ms / 1000 for i in on_victim) - killed_at
        figures = {
            "jobs": len(ids),
            "running_on_killed_replica": len(on_victim),
            "completed": sum(j.state == gpb.JOB_STATE_SUCCEEDED for j in done.values()),
            "lost": 0,
            "done_twice": sum(finish_markers(r, P, "t-crash", i) > 1 for i in ids),
            "claim_idle_ms": CLAIM_IDLE_MS,
            "kill_to_last_rerun_done_s": round(recovered, 2),
            "rerun_generation_s": 3.0,
        }
        print("\nJOB SURVIVAL", json.dumps(figures))
        assert recovered < CLAIM_IDLE_MS / 1000 + 3.0 + 5.0  # claim after idle, then a full 3 s rerun
    finally:
        s.stop()


def test_a_frozen_gateway_is_a_zombie_whose_result_is_refused(tmp_path, redis_server):
    P = "igw:j-zombie:"
    s, keys, other = job_stack(tmp_path, redis_server.url, P, concurrency=1)
    try:
        r = redis.Redis(port=redis_server.port)
        key = new_key(keys, "t-zombie")
        stub = s.gateway_stub("gateway")
        # Freeze the first gateway as soon as it runs the job; the other must claim it.
        job = submit(stub, key, "z", task="zombie", sampling=gpb.SamplingParams(max_tokens=40))
        h = _wait_all_running(r, P, "t-zombie", [job.job_id])[job.job_id]
        victim = "gateway" if h["owner"].decode().startswith(s.config["gateway"]["listen"]) else "gateway-b"
        survivor = other.stub() if victim == "gateway" else stub
        zombie_metrics = s.config["gateway"]["metrics_listen"] if victim == "gateway" else other.metrics
        pid = s.procs[victim].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 10
            while job_hash(r, P, "t-zombie", "z").get("att") != b"2" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert job_hash(r, P, "t-zombie", "z").get("att") == b"2"
        finally:
            os.kill(pid, signal.SIGCONT)
        done = wait_job(survivor, key, "z", timeout_s=20)
        assert done.state == gpb.JOB_STATE_SUCCEEDED and done.attempts == 2
        time.sleep(CLAIM_IDLE_MS / 1000)  # the zombie's next heartbeat (or its finish) learns it lost the job
        assert value(scrape(zombie_metrics), "igw_jobs_total", outcome="refused_stale") == 1
        assert finish_markers(r, P, "t-zombie", "z") == 1 and get_job(survivor, key, "z") == done
    finally:
        s.stop()
