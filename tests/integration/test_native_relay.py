"""The native relay (``gateway.native_relay``, ``native/relay``) switched on: the gateway starts it, Envoy
routes Execute to it and everything else to the gateway; the C++ process carries the messages, the
gateway makes every decision.

Through the relay a client gets what it gets from the gateway's own server (text, usage, event order),
errors keep their status and rich details, a cancel or a deadline stops the worker, and the adversarial
suite's hostile requests (tests/adversarial.py) hurt no canary stream running beside them, leave no quota
lease held and no request on the worker. A relay that dies is started again; a gateway that dies takes its
relay with it, and a draining gateway lets the relay's streams finish.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import pytest
from grpc_status import rpc_status
from hypothesis import given, settings

from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
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
from tests.state_helpers import scrape, value


def native_config(**gateway) -> dict:
    cfg = make_config("synthetic", **({"gateway": gateway} if gateway else {}))
    cfg["gateway"]["native_relay"] = {"enabled": True, "listen": f"127.0.0.1:{free_port()}"}
    return cfg


def relay_of(s) -> psutil.Process:
    """The relay process the stack's gateway started."""
    (relay,) = psutil.Process(s.procs["gateway"].pid).children()
    return relay


def wait_answering(stub, key: str, timeout_s: float = 60) -> None:
    end = time.monotonic() + timeout_s
    req = gpb.ExecuteRequest(task="hi", sampling=gpb.SamplingParams(max_tokens=2))
    while True:
        try:
            list(stub.Execute(req, metadata=_md(key) if key else None, timeout=5))
            return
        except grpc.RpcError:
            assert time.monotonic() < end, "the relay did not answer"
            time.sleep(0.3)


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("native-relay")
    keys = tmp / "keys.yaml"
    cfg = native_config(
        auth={"mode": "api_key", "key_file": str(keys)},
        limits={"default_max_tokens": 8},
        queue={"max_queued": 64},
    )
    cfg["worker"]["synthetic"] = {"tokens_per_s": 3000}
    key = hostile_keys(keys)
    s = build_stack(tmp, cfg)
    s.start_worker()
    s.start_gateway()
    s.start_envoy()
    stub = s.gateway_stub("envoy")  # Execute reaches the relay, GetQuota the gateway
    wait_answering(stub, key)
    canary = CanaryLoop(stub, key)
    state = {"stack": s, "stub": stub, "key": key, "keys": keys, "canary": canary, "calls": 0, "codes": {}}
    state["gateway"] = s.gateway_stub("gateway")
    state["relay"] = gpb_grpc.GatewayStub(grpc.insecure_channel(cfg["gateway"]["native_relay"]["listen"]))
    yield state
    canary.stop()
    s.stop()


def _md(key):
    return [("authorization", f"Bearer {key}")]


def _upstreams_of(s, path: str, n: int) -> list[str]:
    """The upstream hosts of Envoy's last ``n`` access-log lines for ``path`` (Envoy writes its log a
    little later than it answers)."""
    end = time.monotonic() + 10
    while True:
        lines = [json.loads(x) for x in (s.dir / "envoy-access.log").read_text().splitlines() if x.strip()]
        hosts = [x["upstream_host"] for x in lines if x["path"] == path]
        if len(hosts) >= n or time.monotonic() > end:
            return hosts[-n:]
        time.sleep(0.2)


def test_envoy_routes_execute_to_the_relay_and_the_rest_to_the_gateway(native):
    s, md = native["stack"], _md(native["key"])
    list(native["stub"].Execute(gpb.ExecuteRequest(task="hi"), metadata=md, timeout=30))
    assert native["stub"].GetQuota(gpb.GetQuotaRequest(), metadata=md, timeout=10).tenant
    relay = s.config["gateway"]["native_relay"]["listen"]
    assert _upstreams_of(s, "/gateway.v1.Gateway/Execute", 1) == [relay]
    assert _upstreams_of(s, "/gateway.v1.Gateway/GetQuota", 1) == [s.config["gateway"]["listen"]]
    # The relay serves Execute alone.
    with pytest.raises(grpc.RpcError) as err:
        native["relay"].GetQuota(gpb.GetQuotaRequest(), metadata=md, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


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
    raw = grpc.insecure_channel(native["stack"].envoy)
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
    # The relay's own tables, as its pings report them (igw_native_relay_*): nothing held for the storm's
    # callers; one Session stream to the one worker, and its memory, show the reports arrive at all.
    held = {}
    end = time.monotonic() + 10
    while time.monotonic() < end:
        m = scrape(s.config["gateway"]["metrics_listen"])
        held = {
            name: value(m, f"igw_native_relay_{name}")
            for name in ("calls", "bound_requests", "worker_streams", "resident_memory_bytes")
        }
        if held["calls"] == 0 and held["bound_requests"] == 0 and held["worker_streams"] == 1:
            break
        time.sleep(0.5)
    assert held["calls"] == 0 and held["bound_requests"] == 0, f"the relay still holds {held}"
    assert held["worker_streams"] == 1 and held["resident_memory_bytes"] > 1 << 20, held


def test_the_bench_runs(tmp_path):
    """`make bench`'s native-path figures, in a short form so the bench cannot rot."""
    out = tmp_path / "native.json"
    cmd = [sys.executable, "-m", "bench.native_path", "--seconds", "1", "--rounds", "1", "--streams", "4"]
    subprocess.run(cmd + ["--json", str(out)], check=True, timeout=300, capture_output=True)
    figures = json.loads(out.read_text())
    for shape in ("4 streams, 64 tokens", "64 streams, 1-token requests"):
        for path in ("gateway", "native", "bare relay"):
            f = figures[shape][path]
            assert f["tokens/s"] > 0 and f["errors"] == 0 and f["CPU ms per request"] > 0, (shape, path, f)


def test_kill9_of_a_worker_through_the_relay_loses_no_stream(tmp_path):
    """The relay holds a Session stream per worker. When one dies, the tokens its requests had streamed
    reach the core before the news, and the core resumes them on the other worker through the relay (or
    places again those with no token yet): every stream completes with the whole text and exact usage."""
    cfg = native_config()
    cfg["worker"].update(synthetic={"tokens_per_s": 20, "first_token_delay_ms": 1000}, max_concurrent_requests=16)
    addrs = [cfg["worker"]["listen"], f"127.0.0.1:{free_port()}"]
    cfg["gateway"]["workers"] = [{"address": a} for a in addrs]
    s = build_stack(tmp_path, cfg)
    try:
        for i, a in enumerate(addrs):
            s.start_worker(name=f"worker{i}", listen=a)
        s.start_gateway()
        wait_ready_workers(s.gateway_stub("gateway"), 2, timeout=30)
        stub = gpb_grpc.GatewayStub(grpc.insecure_channel(cfg["gateway"]["native_relay"]["listen"]))
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
        log = s.log("gateway").read_text()
        assert "resuming on another worker" in log, "no stream was resumed: the kill came too late to test it"
        assert s.exited() in (None, "worker0"), f"{s.exited()} died"
        s.procs.pop("worker0").wait()
    finally:
        s.stop()


def _stream(stub, max_tokens: int, md=None, timeout: float = 60):
    """(outcome, tokens, detail) of one Execute: ("done", n, text) or (code name, n, details)."""
    got, text = 0, ""
    try:
        req = gpb.ExecuteRequest(task="t", sampling=gpb.SamplingParams(max_tokens=max_tokens))
        for r in stub.Execute(req, metadata=md, timeout=timeout):
            if r.HasField("delta"):
                got, text = got + r.delta.tokens, text + r.delta.text
            elif r.HasField("done"):
                return ("done", got, text)
    except grpc.RpcError as err:
        return (err.code().name, got, err.details())
    return ("no end", got, text)


def _exited(proc: psutil.Process, timeout_s: float = 10) -> bool:
    """Whether ``proc`` exits within ``timeout_s`` (a zombie counts: a stopped gateway cannot reap it)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _new_relay(s, old: psutil.Process) -> psutil.Process:
    end = time.monotonic() + 30
    while True:
        try:
            relay = relay_of(s)
            if relay.pid != old.pid:
                return relay
        except ValueError:  # none yet
            pass
        assert time.monotonic() < end, "the gateway started no new relay"
        time.sleep(0.2)


def test_a_relay_that_dies_is_started_again_and_a_gateway_that_dies_takes_its_relay(tmp_path):
    """kill -9 of the relay: its streams end (UNAVAILABLE, said so), the worker stops generating for
    them, the gateway starts a new relay that serves. A frozen gateway (SIGSTOP) leaves its relay's ping
    unanswered: the relay ends its calls UNAVAILABLE and exits, and the gateway, continued, starts a new
    one. kill -9 of the gateway: its relay ends its open calls UNAVAILABLE and exits."""
    cfg = native_config()
    cfg["gateway"]["native_relay"]["core_timeout_ms"] = 1000
    cfg["worker"]["synthetic"] = {"tokens_per_s": 50}
    s = build_stack(tmp_path, cfg)
    relay_addr = cfg["gateway"]["native_relay"]["listen"]
    try:
        s.start_worker()
        s.start_gateway()
        stub = gpb_grpc.GatewayStub(grpc.insecure_channel(relay_addr))
        wait_answering(stub, "")
        first = relay_of(s)
        with ThreadPoolExecutor(4) as ex:
            fs = [ex.submit(_stream, stub, 500) for _ in range(4)]
            time.sleep(1.5)
            first.kill()
            results = [f.result(timeout=30) for f in fs]
        assert all(r[0] == "UNAVAILABLE" and r[1] > 0 for r in results), results
        s.wait_worker_idle(10)  # the relay's sessions ended: the worker aborted them
        end = time.monotonic() + 10
        while "native relay exited" not in s.log("gateway").read_text():  # logged as the gateway sees it
            assert time.monotonic() < end, "the gateway did not log its relay's exit"
            time.sleep(0.1)
        second = _new_relay(s, first)
        wait_answering(stub, "")
        assert _stream(stub, 20)[:2] == ("done", 20)

        with ThreadPoolExecutor(2) as ex:
            fs = [ex.submit(_stream, stub, 500) for _ in range(2)]
            time.sleep(1.5)
            s.procs["gateway"].send_signal(signal.SIGSTOP)
            t_frozen = time.monotonic()
            results = [f.result(timeout=30) for f in fs]
            cut_after = time.monotonic() - t_frozen
        assert all(r[0] == "UNAVAILABLE" and "gone" in r[2] for r in results), results
        assert cut_after < 5, f"the calls on a frozen gateway's relay ended only after {cut_after:.1f} s"
        assert _exited(second), "the relay of a frozen gateway did not exit"
        s.procs["gateway"].send_signal(signal.SIGCONT)
        second = _new_relay(s, second)
        wait_answering(stub, "")

        # The gateway dies: its relay ends the calls it holds and exits.
        with ThreadPoolExecutor(2) as ex:
            fs = [ex.submit(_stream, stub, 500) for _ in range(2)]
            time.sleep(1.5)
            s.procs["gateway"].send_signal(signal.SIGKILL)
            results = [f.result(timeout=30) for f in fs]
        assert all(r[0] == "UNAVAILABLE" and "gone" in r[2] for r in results), results
        assert _exited(second), "the relay of a dead gateway did not exit"
        s.wait_worker_idle(10)
        s.procs.pop("gateway").wait()
    finally:
        s.stop()


def test_a_slow_client_costs_the_relay_one_merged_delta(native):
    """A client that reads nothing while its tokens stream (a 1 KiB flow-control window, straight to the
    relay): the relay merges what it cannot write into one pending delta, and when the client reads it
    gets every token, in order, in a handful of messages instead of one per engine step."""
    md = _md(native["key"])
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    channel = grpc.insecure_channel(native["stack"].config["gateway"]["native_relay"]["listen"], options=options)
    req = gpb.ExecuteRequest(task="slow", sampling=gpb.SamplingParams(max_tokens=1500, temperature=0))
    call = gpb_grpc.GatewayStub(channel).Execute(req, metadata=md, timeout=60)
    assert next(call).HasField("started")
    time.sleep(2)  # 1,500 tokens at 3,000/s: ~50 engine-paced messages while the client reads nothing
    rest = list(call)
    deltas = [r for r in rest if r.HasField("delta")]
    assert sum(r.delta.tokens for r in deltas) == rest[-1].done.usage.completion_tokens == 1500
    assert len(deltas) < 20, f"{len(deltas)} messages: the relay queued one per step instead of merging"
    paced = list(native["gateway"].Execute(req, metadata=md, timeout=60))
    assert "".join(r.delta.text for r in deltas) == "".join(r.delta.text for r in paced if r.HasField("delta"))
    assert len(paced) > 3 * len(deltas)  # the same request read at once: the steps, unmerged


def test_a_draining_gateway_lets_the_relays_streams_finish(tmp_path):
    """SIGTERM: Envoy stops sending Execute to the replica (its relay's health follows the gateway's),
    the relay's open streams complete, then the relay and the gateway exit."""
    cfg = native_config(drain_notice_s=1.0)
    cfg["worker"]["synthetic"] = {"tokens_per_s": 40}
    s = build_stack(tmp_path, cfg)
    try:
        s.start_worker()
        s.start_gateway()
        s.start_envoy()
        stub = s.gateway_stub("envoy")
        wait_answering(stub, "")
        relay = relay_of(s)
        with ThreadPoolExecutor(3) as ex:
            fs = [ex.submit(_stream, stub, 80) for _ in range(3)]
            time.sleep(1.0)
            s.procs["gateway"].send_signal(signal.SIGTERM)
            results = [f.result(timeout=30) for f in fs]
        assert all(r[:2] == ("done", 80) for r in results), results
        assert s.procs["gateway"].wait(timeout=20) == 0
        relay.wait(timeout=10)
        s.procs.pop("gateway")
    finally:
        s.stop()


def test_envoy_bootstrap_sends_execute_to_each_replicas_relay_checked_on_its_gateway():
    from gateway.envoy_bootstrap import render
    from igw_common import config as config_mod

    gw = {"listen": "127.0.0.1:7000", "processes": 2, "native_relay": {"enabled": True, "listen": "127.0.0.1:7100"}}
    boot = render(config_mod.parse({"gateway": gw}, "test"))
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    execute = [r for r in routes if r["match"].get("path") == "/gateway.v1.Gateway/Execute"]
    assert len(execute) == 1 and execute[0]["route"]["cluster"] == "gateway_native"
    assert routes.index(execute[0]) < next(i for i, r in enumerate(routes) if r["match"].get("prefix") == "/")
    (cluster,) = [c for c in boot["static_resources"]["clusters"] if c["name"] == "gateway_native"]
    endpoints = [e["endpoint"] for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert [e["address"]["socket_address"]["port_value"] for e in endpoints] == [7100, 7101]
    assert [e["health_check_config"]["port_value"] for e in endpoints] == [7000, 7001]
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == "igw.native_relay"
    # Relays listed by hand must pair with the replicas.
    cfg = config_mod.parse({"gateway": gw, "envoy": {"native_upstreams": ["127.0.0.1:7100"]}}, "test")
    with pytest.raises(ValueError, match="envoy.native_upstreams"):
        render(cfg)


def test_a_missing_relay_binary_stops_the_gateway_naming_the_key(tmp_path):
    cfg = native_config()
    cfg["gateway"]["native_relay"]["binary"] = str(tmp_path / "nowhere")
    s = build_stack(tmp_path, cfg)
    out = subprocess.run(
        [sys.executable, "-m", "gateway.server", "--config", str(s.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "gateway.native_relay.binary" in out.stderr and "nowhere" in out.stderr
