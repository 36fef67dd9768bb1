"""Workers that are down or die: clear UNAVAILABLE, never a hang (synthetic engine, real processes)."""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from gateway.v1 import gateway_pb2 as gpb
from tests.helpers import build_stack, free_port, make_config


def test_worker_down_is_unavailable_promptly(tmp_path):
    # A gateway whose only worker address has nothing listening.
    cfg = make_config("synthetic", gateway={"workers": [{"address": f"127.0.0.1:{free_port()}"}]})
    s = build_stack(tmp_path, cfg)
    try:
        s.start_gateway()
        s.start_envoy()
        for via in ("gateway", "envoy"):
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                list(s.gateway_stub(via).Execute(gpb.ExecuteRequest(task="hi"), timeout=30))
            assert time.monotonic() - t0 < 2.0
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            # The client learns that no worker is reachable; which one and why is for the operator's log.
            assert "no worker" in info.value.details()
            assert cfg["gateway"]["workers"][0]["address"] not in info.value.details()
        assert cfg["gateway"]["workers"][0]["address"] in (tmp_path / "gateway.log").read_text()
    finally:
        s.stop()


def test_worker_killed_mid_stream_ends_with_unavailable(tmp_path):
    s = build_stack(tmp_path, make_config("synthetic", worker={"synthetic": {"tokens_per_s": 20}}))
    try:
        s.start_worker()
        s.start_gateway()
        stub = s.gateway_stub("gateway")
        call = stub.Execute(gpb.ExecuteRequest(task="go", sampling=gpb.SamplingParams(max_tokens=200)), timeout=30)
        got = 0
        for resp in call:
            if resp.WhichOneof("event") == "delta":
                got += resp.delta.tokens
                if got >= 3:
                    break
        s.procs["worker"].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        assert time.monotonic() - t0 < 3.0
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "cut after" in info.value.details() and "incomplete" in info.value.details()

        # New calls fail fast while it is down...
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Execute(gpb.ExecuteRequest(task="hi"), timeout=30))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # ...and succeed again once it is back (the gateway reconnects by itself).
        s.procs.pop("worker").wait()
        s.start_worker()
        deadline = time.monotonic() + 15
        while True:
            try:
                done = list(
                    stub.Execute(gpb.ExecuteRequest(task="hi", sampling=gpb.SamplingParams(max_tokens=3)), timeout=30)
                )[-1].done
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() < deadline, "gateway did not reconnect to the restarted worker"
                time.sleep(0.2)
        assert done.usage.completion_tokens == 3
    finally:
        s.stop()


def test_cancel_reaches_worker(synthetic_stack):
    stub = synthetic_stack.gateway_stub("envoy")
    before = synthetic_stack.worker_load()
    call = stub.Execute(gpb.ExecuteRequest(task="go", sampling=gpb.SamplingParams(max_tokens=1000)), timeout=60)
    for resp in call:
        if resp.WhichOneof("event") == "delta":
            break
    call.cancel()
    load, _ = synthetic_stack.wait_worker_idle(1.0)
    assert load.active_requests == 0
    assert load.requests_aborted_total == before.requests_aborted_total + 1


def test_worker_sigterm_drains_in_flight(tmp_path):
    s = build_stack(tmp_path, make_config("synthetic", worker={"synthetic": {"tokens_per_s": 50}}))
    try:
        s.start_worker()
        s.start_gateway()
        call = s.gateway_stub("gateway").Execute(
            gpb.ExecuteRequest(task="go", sampling=gpb.SamplingParams(max_tokens=40)), timeout=30
        )
        first = next(iter(call))
        assert first.WhichOneof("event") == "started"
        s.procs["worker"].send_signal(signal.SIGTERM)
        rest = list(call)
        assert rest[-1].done.usage.completion_tokens == 40
        assert s.procs["worker"].wait(10) == 0
    finally:
        s.stop()
