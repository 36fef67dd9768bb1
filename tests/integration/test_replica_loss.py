"""A gateway replica lost without warning (kill -9, a frozen process) behind Envoy, under load.

Three replicas, 24 clients looping on 40-token streams, one replica killed (SIGKILL) or frozen
(SIGSTOP). What must hold (issue #26):
- no call that starts after the loss fails: Envoy retries it elsewhere (connect failure, reset
  before headers), ejects the replica on its first refused connection and drops it from rotation
  at its next health check;
- a stream the lost replica was serving ends promptly with a status a client can tell is safe to
  retry: UNAVAILABLE, or INTERNAL without the gateway's ``grpc-status-details-bin`` trailer, which
  is how every gRPC client reports the HTTP/2 reset Envoy sends when a started stream's upstream
  is gone (Envoy cannot end a started stream with a status; docs/api.md says what to do).

The ``igw`` CLI's retry of a call that failed before its first token is checked here too, against
a small server on loopback that fails on purpose.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import urllib.request
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.rpc import status_pb2
from grpc_status import rpc_status

from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from tests.helpers import BIN, build_stack, free_port, make_config, set_replicas

CLIENTS = 24
TOKENS = 40  # 1 s per stream at 40 tokens/s
KEEPALIVE_MS = 1_000  # Envoy's ping to each replica, and how long it waits for the answer (SIGSTOP)


def _replica_status(admin: str, address: str) -> dict:
    data = json.loads(urllib.request.urlopen(f"http://{admin}/clusters?format=json", timeout=2).read())
    for cluster in data["cluster_statuses"]:
        if cluster["name"] != "gateway":
            continue
        for host in cluster["host_statuses"]:
            sock = host["address"]["socket_address"]
            if f"{sock['address']}:{sock['port_value']}" == address:
                return host["health_status"]
    raise AssertionError(f"{address} is not in Envoy's gateway cluster")


def _out_of_rotation(status: dict) -> bool:
    return bool(status.get("failed_active_health_check") or status.get("failed_outlier_check"))


def test_failover_keys_reach_envoy_and_envoy_accepts_them(tmp_path):
    from gateway import envoy_bootstrap
    from igw_common import config
    from igw_stack import launcher as stack

    cfg = config.parse(
        {
            "envoy": {
                "upstreams": ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"],
                "health_check_timeout_ms": 700,
                "upstream_keepalive_timeout_ms": 1_500,
                "failover": {
                    "retries": 3,
                    "host_selection_attempts": 7,
                    "retry_budget_percent": 40,
                    "min_retry_concurrency": 12,
                    "eject_after_failures": 2,
                },
            }
        }
    )
    boot = envoy_bootstrap.render(cfg)
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    retry = hcm["route_config"]["virtual_hosts"][0]["routes"][-2]["route"]["retry_policy"]
    assert retry["num_retries"] == 3 and retry["host_selection_retry_max_attempts"] == 7
    cluster = boot["static_resources"]["clusters"][0]
    budget = cluster["circuit_breakers"]["thresholds"][0]["retry_budget"]
    assert budget == {"budget_percent": {"value": 40.0}, "min_retry_concurrency": 12}
    outlier = cluster["outlier_detection"]
    assert outlier["split_external_local_origin_errors"] and outlier["consecutive_local_origin_failure"] == 2
    # The gateway's own answers (UNAVAILABLE when no worker is reachable) never eject a replica.
    assert outlier["enforcing_consecutive_5xx"] == 0 and outlier["enforcing_consecutive_gateway_failure"] == 0
    assert cluster["health_checks"][0]["timeout"] == "0.7s"
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["explicit_http_config"]["http2_protocol_options"]["connection_keepalive"]["timeout"] == "1.5s"
    path = tmp_path / "envoy.yaml"
    path.write_text(json.dumps(boot))
    r = subprocess.run(
        [stack.envoy_binary(cfg.envoy), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["sigkill", "sigstop"])
def test_lost_replica_loses_no_new_call_and_its_streams_end_retryable(tmp_path, sig):
    cfg = make_config(
        "synthetic",
        worker={"synthetic": {"tokens_per_s": 40}, "max_concurrent_requests": 256},
        gateway={"http_listen": "", "min_ping_interval_ms": KEEPALIVE_MS},
        envoy={"upstream_keepalive_ms": KEEPALIVE_MS, "upstream_keepalive_timeout_ms": KEEPALIVE_MS},
    )
    if "native_relay" in cfg["gateway"]:  # `make test-native`: relays notice a frozen gateway as Envoy does
        cfg["gateway"]["native_relay"]["core_timeout_ms"] = KEEPALIVE_MS
    replicas = [cfg["gateway"]["listen"], f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    set_replicas(cfg, replicas)
    s = build_stack(tmp_path, cfg)
    victim = None
    try:
        s.start_worker()
        for i, address in enumerate(replicas):
            s.start_gateway(f"gateway{i}", address)
        s.start_envoy()
        stub = s.gateway_stub("envoy")
        stop = threading.Event()
        results, lock = [], threading.Lock()
        request = gpb.ExecuteRequest(task="go", sampling=gpb.SamplingParams(max_tokens=TOKENS))

        def client():
            while not stop.is_set():
                t0, tokens = time.monotonic(), 0
                try:
                    for event in stub.Execute(request, timeout=30):
                        if event.HasField("delta"):
                            tokens += event.delta.tokens
                        elif event.HasField("done"):
                            outcome = ("OK", event.done.usage.completion_tokens, "")
                except grpc.RpcError as err:
                    keys = {k for k, _ in err.trailing_metadata() or ()}
                    from_gateway = "grpc-status-details-bin" in keys
                    outcome = (err.code().name, from_gateway, err.details())
                with lock:
                    results.append((t0, time.monotonic(), tokens, *outcome))

        with ThreadPoolExecutor(CLIENTS) as ex:
            fs = [ex.submit(client) for _ in range(CLIENTS)]
            time.sleep(2.5)  # every client has streams going on every replica
            victim = s.procs["gateway1"]
            t_loss = time.monotonic()
            victim.send_signal(sig)
            out_after = None
            while time.monotonic() - t_loss < 4:
                if out_after is None and _out_of_rotation(_replica_status(s.envoy_admin, replicas[1])):
                    out_after = time.monotonic() - t_loss
                time.sleep(0.02)
            stop.set()
            for f in fs:
                f.result(timeout=40)

        after = [r for r in results if r[0] > t_loss]
        in_flight = [r for r in results if r[0] <= t_loss < r[1]]
        cut = [r for r in in_flight if r[3] != "OK"]
        cut_end = max((r[1] - t_loss for r in cut), default=0.0)
        print(
            f"{sig.name}: out of rotation after {out_after * 1000:.0f} ms; {len(after)} calls started after the "
            f"loss, {sum(r[3] == 'OK' for r in after)} OK; {len(in_flight)} in flight, {len(cut)} cut "
            f"({sorted({(r[3], r[5][:60]) for r in cut})}), the last ended {cut_end * 1000:.0f} ms after the loss"
        )
        assert len(after) >= CLIENTS
        failed_after = [r for r in after if r[3] != "OK" or r[4] != TOKENS]
        assert not failed_after, failed_after[:5]
        # The lost replica was serving some of the streams: they end, promptly, retryable.
        assert cut, "no stream was cut: the lost replica served none, the test proves nothing"
        for *_, code, from_gateway, details in cut:
            assert code in ("UNAVAILABLE", "INTERNAL"), (code, details)
            if code == "INTERNAL":  # the HTTP/2 reset of a started stream, not a status the gateway sent
                assert not from_gateway and "RST_STREAM" in details, details
        # SIGKILL: the kernel closes the connections at once. SIGSTOP: Envoy's keepalive ping goes
        # unanswered for upstream_keepalive_timeout_ms, at most upstream_keepalive_ms after the freeze.
        assert cut_end < (1.0 if sig == signal.SIGKILL else 2 * KEEPALIVE_MS / 1000 + 1.0)
        # Ejected on its first refused connection (SIGKILL) or its first unanswered health check
        # (SIGSTOP: health_check_interval_ms + health_check_timeout_ms, 1 s each by default).
        assert out_after is not None and out_after < (1.0 if sig == signal.SIGKILL else 2.5)
    finally:
        if victim is not None and victim.poll() is None:
            victim.send_signal(signal.SIGKILL)  # a frozen process takes no SIGTERM
            victim.wait(10)
        s.stop()


# --- the CLI retries a call that failed before its first token ---------------------------------


class _FailingGateway(gpb_grpc.GatewayServicer):
    """Fails the first calls as scripted (``plan``: ``(code, tokens before failing, with details)``),
    then streams a short answer."""

    def __init__(self, plan):
        self.plan = list(plan)
        self.calls = 0

    def Execute(self, request, context):
        self.calls += 1
        if self.plan:
            code, tokens, with_details = self.plan.pop(0)
            yield gpb.ExecuteResponse(started=gpb.Started(request_id=f"r{self.calls}"))
            for _ in range(tokens):
                yield gpb.ExecuteResponse(delta=gpb.Delta(text="partial ", tokens=1))
            if with_details:  # as the gateway's own errors are: google.rpc.Status in grpc-status-details-bin
                context.abort_with_status(
                    rpc_status.to_status(status_pb2.Status(code=code.value[0], message="scripted failure"))
                )
            context.abort(code, "scripted failure")  # as Envoy's answers and a reset stream are
        yield gpb.ExecuteResponse(started=gpb.Started(request_id=f"r{self.calls}"))
        yield gpb.ExecuteResponse(delta=gpb.Delta(text="hello", tokens=1))
        yield gpb.ExecuteResponse(done=gpb.Done(usage=gpb.Usage(completion_tokens=1)))


def _igw_against(plan, *args):
    server = grpc.server(futures.ThreadPoolExecutor(4))
    servicer = _FailingGateway(plan)
    gpb_grpc.add_GatewayServicer_to_server(servicer, server)
    address = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(address)
    server.start()
    try:
        r = subprocess.run(
            [str(BIN / "igw"), "--target", address, *args, "hi"], capture_output=True, text=True, timeout=60
        )
    finally:
        server.stop(None)
    return r, servicer.calls


@pytest.mark.parametrize(
    "plan",
    [
        [(grpc.StatusCode.UNAVAILABLE, 0, True)],  # e.g. no reachable worker
        [(grpc.StatusCode.UNAVAILABLE, 0, False), (grpc.StatusCode.INTERNAL, 0, False)],  # Envoy; a reset
    ],
    ids=["unavailable", "unavailable-then-reset"],
)
def test_cli_retries_a_call_that_failed_before_its_first_token(plan):
    r, calls = _igw_against(plan)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "hello" and calls == len(plan) + 1
    assert r.stderr.count("retrying") == len(plan), r.stderr


@pytest.mark.parametrize(
    "plan, expect",
    [
        ([(grpc.StatusCode.INTERNAL, 2, False)], "cut after 2 tokens"),  # a lost replica, mid-stream
        ([(grpc.StatusCode.INTERNAL, 0, True)], "INTERNAL"),  # the gateway's own: a bug, not retried
        ([(grpc.StatusCode.INVALID_ARGUMENT, 0, True)], "INVALID_ARGUMENT"),
    ],
    ids=["tokens-already-out", "gateway-internal", "invalid-argument"],
)
def test_cli_does_not_retry_what_is_not_safe_to_retry(plan, expect):
    r, calls = _igw_against(plan)
    assert r.returncode == 1 and calls == 1, r.stderr
    assert expect in r.stderr and "retrying" not in r.stderr, r.stderr


def test_cli_gives_up_after_its_retries():
    r, calls = _igw_against([(grpc.StatusCode.UNAVAILABLE, 0, True)] * 5, "--retries", "1")
    assert r.returncode == 1 and calls == 2, r.stderr
    assert "UNAVAILABLE" in r.stderr
