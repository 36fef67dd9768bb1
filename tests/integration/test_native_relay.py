"""The native relay (the experiment of issue #25, ``native/relay``) behind the real gateway core
(``bench.native_core``): the C++ process carries the messages, the core makes every decision.

What its figures in docs/performance.md rest on: through the relay a client gets what it gets from
the gateway (text, usage, event order), errors keep their status and rich details, a cancel or a
deadline stops the worker, and the adversarial suite's hostile requests (tests/adversarial.py) hurt
no canary stream running beside them, leave no quota lease held and no request on the worker.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_status import rpc_status
from hypothesis import given, settings

from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from igw_stack import launcher as stack
from tests.adversarial import (
    SETTINGS,
    CanaryLoop,
    after_the_storm,
    credentials,
    hostile_case,
    hostile_keys,
    requests,
    timeouts,
)
from tests.helpers import build_stack, free_port, make_config, new_key, wait_ready_workers

RELAY_BIN = Path(__file__).resolve().parents[2] / "native" / "relay" / "build" / "native_relay"


class Split:
    """Execute through the relay; GetQuota (which the relay does not serve) from the core's own port."""

    def __init__(self, relay: str, core: str):
        self.Execute = gpb_grpc.GatewayStub(grpc.insecure_channel(relay)).Execute
        self.GetQuota = gpb_grpc.GatewayStub(grpc.insecure_channel(core)).GetQuota


def wait_answering(stub, key: str, timeout_s: float = 60) -> None:
    end = time.monotonic() + timeout_s
    req = gpb.ExecuteRequest(task="hi", sampling=gpb.SamplingParams(max_tokens=2))
    while True:
        try:
            list(stub.Execute(req, metadata=[("authorization", f"Bearer {key}")], timeout=5))
            return
        except grpc.RpcError:
            assert time.monotonic() < end, "the relay did not answer"
            time.sleep(0.3)


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("native-relay")
    keys = tmp / "keys.yaml"
    cfg = make_config(
        "synthetic",
        gateway={
            "auth": {"mode": "api_key", "key_file": str(keys)},
            "limits": {"default_max_tokens": 8},
            "queue": {"max_queued": 64},
        },
        worker={"synthetic": {"tokens_per_s": 3000}},
    )
    key = hostile_keys(keys)
    s = build_stack(tmp, cfg)
    core, relay, sock = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", str(tmp / "core.sock")
    s.start_worker()
    s.start_gateway()  # today's gateway, for comparison, on the same worker
    core_cmd = [sys.executable, "-m", "bench.native_core", "--config", str(s.config_path), "--listen", core]
    s.start_process("native-core", core_cmd + ["--socket", sock], core, 60)
    relay_cmd = [str(RELAY_BIN), "--listen", relay, "--core-socket", sock]
    s.procs["native-relay"] = stack.start(relay_cmd, log_path=s.log("native-relay"))
    stub = Split(relay, core)
    wait_answering(stub, key)
    canary = CanaryLoop(stub, key)
    state = {"stack": s, "stub": stub, "key": key, "keys": keys, "canary": canary, "calls": 0, "codes": {}}
    state["gateway"] = s.gateway_stub("gateway")
    yield state
    canary.stop()
    s.stop()


def _md(key):
    return [("authorization", f"Bearer {key}")]


def test_the_relay_answers_as_the_gateway_does(native):
    req = gpb.ExecuteRequest(task="Say something", sampling=gpb.SamplingParams(max_tokens=40, temperature=0))
    answers = {}
    for name, stub in (("gateway", native["gateway"]), ("relay", native["stub"])):
        out = list(stub.Execute(req, metadata=_md(native["key"]), timeout=30))
        kinds = [r.WhichOneof("event") for r in out]
        assert kinds[0] == "started" and kinds[-1] == "done" and set(kinds[1:-1]) == {"delta"}, (name, kinds)
        usage = out[-1].done.usage
        assert sum(r.delta.tokens for r in out if r.HasField("delta")) == usage.completion_tokens == 40
        answers[name] = ("".join(r.delta.text for r in out), usage.prompt_tokens, out[0].started.model)
    assert answers["relay"] == answers["gateway"]


def _error(stub, req, md):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Execute(req, metadata=md, timeout=30))
    status = rpc_status.from_call(err.value)
    return err.value.code(), err.value.details(), status


def test_errors_keep_their_status_and_details(native):
    stub, md = native["stub"], _md(native["key"])
    req = gpb.ExecuteRequest(task="x", sampling=gpb.SamplingParams(max_tokens=4))
    code, details, _ = _error(stub, req, [])
    assert code == grpc.StatusCode.UNAUTHENTICATED and "API key" in details
    bad = gpb.ExecuteRequest(task="x", sampling=gpb.SamplingParams(max_tokens=4, temperature=9))
    code, details, status = _error(stub, bad, md)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("sampling.temperature")
    from google.rpc import error_details_pb2

    violation = error_details_pb2.BadRequest()
    assert status is not None and status.details[0].Unpack(violation)
    assert violation.field_violations[0].field == "sampling.temperature"
    # A body protobuf cannot decode is the core's to explain, field by name, as on the gateway.
    raw = grpc.insecure_channel(_relay_address(native))
    call = raw.unary_stream("/gateway.v1.Gateway/Execute", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        list(call(b"\x0a\x05\xff\xfe\xfd\xfc\xfb", metadata=md, timeout=30))  # task: 5 bytes, not UTF-8
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "task" in err.value.details()


def test_a_refusal_keeps_its_trailers(native):
    md = _md(new_key(native["keys"], "hostile", "--rpm", "1"))
    req = gpb.ExecuteRequest(task="x", sampling=gpb.SamplingParams(max_tokens=2))
    end = time.monotonic() + 15
    while True:  # until the core's watch of the key file has seen the new key (slower on a busy machine)
        try:
            list(native["stub"].Execute(req, metadata=md, timeout=30))
            break
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() < end, err
            time.sleep(0.2)
    with pytest.raises(grpc.RpcError) as err:
        list(native["stub"].Execute(req, metadata=md, timeout=30))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(err.value.trailing_metadata())["retry-after"]) >= 1


def _relay_address(native) -> str:
    args = native["stack"].procs["native-relay"].args
    return args[args.index("--listen") + 1]


def _worker_idle(s, timeout_s: float = 5.0) -> bool:
    end = time.monotonic() + timeout_s
    while s.worker_load().active_requests:
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def test_a_cancel_or_a_deadline_stops_the_worker(native):
    s, stub, md = native["stack"], native["stub"], _md(native["key"])
    native["canary"].stop()  # the worker's count of active requests must be ours alone
    try:
        req = gpb.ExecuteRequest(task="long", sampling=gpb.SamplingParams(max_tokens=1500))
        aborted = s.worker_load().requests_aborted_total
        call, got = stub.Execute(req, metadata=md, timeout=60), 0
        for r in call:
            got += r.delta.tokens
            if got >= 20:
                call.cancel()
                break
        assert _worker_idle(s), "the worker still generates for a client that cancelled"
        assert s.worker_load().requests_aborted_total == aborted + 1
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Execute(req, metadata=md, timeout=0.2))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _worker_idle(s), "the worker still generates for a call past its deadline"
        assert s.worker_load().requests_aborted_total == aborted + 2
    finally:
        native["canary"] = CanaryLoop(stub, native["key"])


@settings(**SETTINGS)
@given(request=requests(), cred=credentials, timeout=timeouts)
def test_hostile_requests_through_the_relay_hurt_nobody(native, request, cred, timeout):
    hostile_case(native, request, cred, timeout)


def test_after_the_storm_the_relay_and_worker_hold_nothing(native):
    s, stub = native["stack"], native["stub"]
    md = after_the_storm(native)
    assert _worker_idle(s), "a request is still on the worker for a caller that is gone"
    assert s.exited() is None, f"{s.exited()} died"
    req = gpb.ExecuteRequest(task="after", sampling=gpb.SamplingParams(max_tokens=5))
    assert list(stub.Execute(req, metadata=md, timeout=30))[-1].done.usage.completion_tokens == 5


def test_the_bench_runs(tmp_path):
    """`make bench`'s native-path figures, in a short form so the bench cannot rot."""
    out = tmp_path / "native.json"
    cmd = [sys.executable, "-m", "bench.native_path", "--seconds", "1", "--rounds", "1", "--streams", "4"]
    subprocess.run(cmd + ["--json", str(out)], check=True, timeout=300, capture_output=True)
    figures = json.loads(out.read_text())
    for shape in ("4 streams, 64 tokens", "64 streams, 1-token requests"):
        for path in ("gateway", "native", "native, socket", "bare relay"):
            f = figures[shape][path]
            assert f["tokens/s"] > 0 and f["errors"] == 0 and f["CPU ms per request"] > 0, (shape, path, f)


def test_kill9_of_a_worker_through_the_relay_loses_no_stream(tmp_path):
    """The relay holds a Session stream per worker. When one dies, the tokens its requests had streamed
    reach the core before the news, and the core resumes them on the other worker through the relay (or
    places again those with no token yet): every stream completes with the whole text and exact usage."""
    cfg = make_config(
        "synthetic",
        worker={"synthetic": {"tokens_per_s": 20, "first_token_delay_ms": 1000}, "max_concurrent_requests": 16},
    )
    addrs = [cfg["worker"]["listen"], f"127.0.0.1:{free_port()}"]
    cfg["gateway"]["workers"] = [{"address": a} for a in addrs]
    s = build_stack(tmp_path, cfg)
    core, relay, sock = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", str(tmp_path / "core.sock")
    try:
        for i, a in enumerate(addrs):
            s.start_worker(name=f"worker{i}", listen=a)
        core_cmd = [sys.executable, "-m", "bench.native_core", "--config", str(s.config_path), "--listen", core]
        s.start_process("native-core", core_cmd + ["--socket", sock], core, 60)
        s.procs["native-relay"] = stack.start(
            [str(RELAY_BIN), "--listen", relay, "--core-socket", sock], log_path=s.log("native-relay")
        )
        core_stub = gpb_grpc.GatewayStub(grpc.insecure_channel(core))
        wait_ready_workers(core_stub, 2, timeout=30)
        stub = gpb_grpc.GatewayStub(grpc.insecure_channel(relay))
        results = []

        def one(i):
            text, got = "", 0
            try:
                for r in stub.Execute(
                    gpb.ExecuteRequest(task=f"t{i}", sampling=gpb.SamplingParams(max_tokens=60)), timeout=60
                ):
                    if r.HasField("delta"):
                        got, text = got + r.delta.tokens, text + r.delta.text
                    elif r.HasField("done"):
                        return ("done", got, r.done.usage.completion_tokens, text)
            except grpc.RpcError as err:
                return (err.code().name, got, err.details())

        with ThreadPoolExecutor(16) as ex:
            fs = [ex.submit(one, i) for i in range(8)]
            time.sleep(1.6)  # the first 8 stream tokens
            fs += [ex.submit(one, i) for i in range(8, 16)]
            time.sleep(0.3)  # these 8 are accepted but still in prefill
            s.procs["worker0"].send_signal(signal.SIGKILL)
            results = [f.result(timeout=60) for f in fs]
        words = "lorem ipsum dolor sit amet".split()
        whole = "".join(words[i % 5] + " " for i in range(60))
        assert all(r[0] == "done" and r[1] == r[2] == 60 and r[3] == whole for r in results), results
        log = s.log("native-core").read_text()
        assert "resuming on another worker" in log, "no stream was resumed: the kill came too late to test it"
        assert s.exited() in (None, "worker0"), f"{s.exited()} died"
        s.procs.pop("worker0").wait()
    finally:
        s.stop()
