"""Envoy at the edge, reflection, health, the CLI and the stack runner (synthetic engine)."""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from gateway import envoy_bootstrap
from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from igw_common.config import EnvoyConfig
from igw_stack import launcher as stack
from tests.helpers import PY, build_stack, make_config

BIN = Path(sys.executable).parent


def test_reflection_lets_a_client_call_execute_without_protos(synthetic_stack):
    """What grpcurl does: discover the service through reflection, build messages, call."""
    channel = grpc.insecure_channel(synthetic_stack.envoy)
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {"gateway.v1.Gateway", "grpc.health.v1.Health"} <= services
    pool = descriptor_pool.DescriptorPool(db)
    method = pool.FindServiceByName("gateway.v1.Gateway").methods_by_name["Execute"]
    assert method.server_streaming and not method.client_streaming
    Request = message_factory.GetMessageClass(method.input_type)
    Response = message_factory.GetMessageClass(method.output_type)
    req = Request(task="hello")
    req.sampling.max_tokens = 4
    call = channel.unary_stream(
        "/gateway.v1.Gateway/Execute",
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )
    events = [r.WhichOneof("event") for r in call(req, timeout=10)]
    assert events[0] == "started" and events[-1] == "done" and events.count("delta") == 4
    channel.close()


def test_health_through_envoy_and_direct(synthetic_stack):
    for addr in (synthetic_stack.envoy, synthetic_stack.gateway):
        with grpc.insecure_channel(addr) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="gateway.v1.Gateway"), timeout=5
            )
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_envoy_writes_json_access_log(synthetic_stack):
    from gateway.v1 import gateway_pb2 as gpb

    list(
        synthetic_stack.gateway_stub("envoy").Execute(
            gpb.ExecuteRequest(task="hi", request_id="acc-1", sampling=gpb.SamplingParams(max_tokens=2)), timeout=10
        )
    )
    path = Path(synthetic_stack.config["envoy"]["access_log_path"])
    deadline = time.monotonic() + 5  # Envoy flushes its access log about once a second
    while True:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        execs = [line for line in lines if line["path"] == "/gateway.v1.Gateway/Execute"]
        if execs or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert execs, f"no Execute line in {path}"
    assert execs[-1]["grpc_status"] == "OK" and execs[-1]["protocol"] == "HTTP/2"


async def test_a_client_cancelling_most_of_its_streams_keeps_its_connection(synthetic_stack):
    """An IDE assistant cancels most completions it asks for. On Envoy's default HTTP/2 codec (nghttp2) such a
    connection was failed about every 1,000 cancels (GOAWAY INTERNAL_ERROR, the access log's
    "codec_error:The_user_callback_function_failed"), cutting every other stream on it UNAVAILABLE; the
    bootstrap selects oghttp2. Thousands of streams cancelled after their first token, on one connection
    beside whole streams: every whole stream completes and Envoy records no protocol error."""
    s = synthetic_stack
    admin = s.config["envoy"]["admin_listen"]

    def protocol_errors() -> int:
        stats = urllib.request.urlopen(f"http://{admin}/stats?filter=downstream_cx_protocol_error", timeout=5)
        return sum(int(line.rsplit(":", 1)[1]) for line in stats.read().decode().splitlines() if "public." in line)

    before = protocol_errors()
    cancelled, whole = 0, collections.Counter()
    until = time.monotonic() + 40
    async with grpc.aio.insecure_channel(s.config["envoy"]["listen"]) as channel:
        stub = gpb_grpc.GatewayStub(channel)
        req = gpb.ExecuteRequest(task="hi", sampling=gpb.SamplingParams(max_tokens=64))

        async def cancelling():
            nonlocal cancelled
            while cancelled < 5000 and time.monotonic() < until:
                call = stub.Execute(req, timeout=30)
                try:
                    await call.read()  # Started, then the first token: the stream is carrying data
                    await call.read()
                except grpc.aio.AioRpcError as err:
                    whole[f"cancelling stream: {err.code().name}"] += 1
                call.cancel()
                cancelled += 1

        async def whole_streams():
            while cancelled < 5000 and time.monotonic() < until:
                short = gpb.ExecuteRequest(task="hi", sampling=gpb.SamplingParams(max_tokens=4))
                try:
                    async for _ in stub.Execute(short, timeout=30):
                        pass
                    whole["OK"] += 1
                except grpc.aio.AioRpcError as err:
                    whole[err.code().name] += 1

        await asyncio.gather(*[cancelling() for _ in range(24)], *[whole_streams() for _ in range(4)])
    assert cancelled >= 3000, cancelled  # enough for nghttp2 to have failed the connection a few times
    assert set(whole) == {"OK"}, whole
    assert protocol_errors() == before


def test_envoy_admin_only_on_loopback_and_route_timeout_off():
    render = envoy_bootstrap
    from igw_common.config import Config

    boot = render.render(Config())
    assert boot["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["timeout"] == "0s"
    # Every client is external: its x-forwarded-for and x-envoy-* headers steer nothing.
    assert hcm["use_remote_address"] is True
    assert [r["address_prefix"] for r in hcm["internal_address_config"]["cidr_ranges"]] == ["0.0.0.0", "::"]
    assert hcm["stream_idle_timeout"] == "300s"
    cluster = boot["static_resources"]["clusters"][0]
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == "gateway.v1.Gateway"
    assert (
        "http2_protocol_options"
        in cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"][
            "explicit_http_config"
        ]
    )


def test_long_stream_outlives_envoy_default_route_timeout(tmp_path):
    """Envoy's default route timeout (15 s) would cut this 17 s stream."""
    s = build_stack(tmp_path, make_config("synthetic", worker={"synthetic": {"tokens_per_s": 10}}))
    from gateway.v1 import gateway_pb2 as gpb

    try:
        s.start_worker()
        s.start_gateway()
        s.start_envoy()
        t0 = time.monotonic()
        out = list(
            s.gateway_stub("envoy").Execute(
                gpb.ExecuteRequest(task="go", sampling=gpb.SamplingParams(max_tokens=170)), timeout=60
            )
        )
        assert time.monotonic() - t0 > 15
        assert out[-1].done.usage.completion_tokens == 170
    finally:
        s.stop()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_tls_listener(tmp_path):
    cert, key = _self_signed(tmp_path)
    cfg = make_config("synthetic", envoy={"tls": {"cert_file": str(cert), "key_file": str(key)}})
    s = build_stack(tmp_path, cfg)
    from gateway.v1 import gateway_pb2 as gpb
    from gateway.v1 import gateway_pb2_grpc as gpb_grpc

    try:
        s.start_worker()
        s.start_gateway()
        rendered = tmp_path / "envoy.yaml"
        subprocess.run(
            [PY, "-m", "gateway.envoy_bootstrap", "--config", str(s.config_path), "--out", str(rendered)], check=True
        )
        s.procs["envoy"] = stack.start(stack.envoy_command(EnvoyConfig(), rendered), log_path=s.log("envoy"))
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        deadline = time.monotonic() + 20
        while True:
            try:
                with grpc.secure_channel(s.envoy, creds) as ch:
                    out = list(
                        gpb_grpc.GatewayStub(ch).Execute(
                            gpb.ExecuteRequest(task="hi", sampling=gpb.SamplingParams(max_tokens=2)), timeout=5
                        )
                    )
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "TLS listener never served"
                time.sleep(0.3)
        assert out[-1].done.usage.completion_tokens == 2
        # Plaintext to the TLS port fails.
        with pytest.raises(grpc.RpcError):
            with grpc.insecure_channel(s.envoy) as ch:
                list(gpb_grpc.GatewayStub(ch).Execute(gpb.ExecuteRequest(task="hi"), timeout=3))

        # The igw client speaks TLS: trusting the self-signed certificate, by address or by name.
        def igw(*flags):
            return subprocess.run(
                [str(BIN / "igw"), "--target", s.envoy, "--max-tokens", "3", "--timeout", "10", *flags, "hello"],
                capture_output=True,
                text=True,
                timeout=30,
            )

        for flags in (("--tls", "--ca-file", str(cert)), ("--ca-file", str(cert), "--server-name", "localhost")):
            r = igw(*flags)
            assert r.returncode == 0 and r.stdout.strip() == "lorem ipsum dolor", (flags, r.stderr)
            assert "completion_tokens=3" in r.stderr
        # Verification is on: the system roots do not know this certificate, nor does it name that host.
        for flags in (("--tls",), ("--ca-file", str(cert), "--server-name", "other.example")):
            r = igw(*flags)
            assert r.returncode == 1 and "UNAVAILABLE" in r.stderr, (flags, r.stderr)
        r = igw()  # plaintext
        assert r.returncode == 1 and "error: UNAVAILABLE" in r.stderr
        r = igw("--ca-file", str(tmp_path / "missing.pem"))
        assert r.returncode == 2 and "missing.pem" in r.stderr
    finally:
        s.stop()


def test_cli_warns_before_sending_a_key_in_plaintext():
    """An API key is a bearer secret: igw says so when it would cross a network unencrypted."""
    base = [str(BIN / "igw"), "--timeout", "0.5", "--api-key", "igw_x_y", "hi"]
    # 192.0.2.1 (TEST-NET-1) answers nothing: the call times out after the warning.
    r = subprocess.run([*base, "--target", "192.0.2.1:9"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "without TLS; use --tls" in r.stderr and "igw_x_y" not in r.stderr
    r = subprocess.run(
        [*base, "--target", f"127.0.0.1:{stack.free_port()}"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 1 and "without TLS" not in r.stderr


STEERING_HEADERS = (
    ("x-forwarded-for", "10.1.2.3"),  # "I am on your private network"
    ("x-envoy-internal", "true"),
    ("x-envoy-upstream-rq-timeout-ms", "1"),
    ("x-envoy-upstream-rq-per-try-timeout-ms", "1"),
    ("x-envoy-max-retries", "5"),
    ("x-envoy-retry-on", "5xx,reset,connect-failure"),
    ("x-envoy-retry-grpc-on", "cancelled,unavailable,deadline-exceeded"),
)


def test_client_cannot_make_itself_internal(synthetic_stack, tmp_path):
    """A client that claims a private address gets no say over Envoy's timeouts and retries,
    and the access log names the real peer, not the address the client wrote.

    The same headers cut the stream short on an Envoy configured as Envoy < 1.33 behaved
    by default (RFC 1918 addresses internal, x-forwarded-for taken as the client), which
    shows they would have acted; on ours the stream completes.
    """
    from gateway.v1 import gateway_pb2 as gpb
    from gateway.v1 import gateway_pb2_grpc as gpb_grpc
    from igw_common import config as config_mod

    agent = f"steer-test-{time.monotonic_ns()}"

    def stream(addr, md=STEERING_HEADERS):
        with grpc.insecure_channel(addr, options=[("grpc.primary_user_agent", agent)]) as ch:
            return list(
                gpb_grpc.GatewayStub(ch).Execute(
                    gpb.ExecuteRequest(task="hi", sampling=gpb.SamplingParams(max_tokens=50)), metadata=md, timeout=10
                )
            )

    out = stream(synthetic_stack.envoy)  # 50 tokens at 50/s: 1 s, far above the 1 ms asked for
    assert out[-1].done.usage.completion_tokens == 50
    log = Path(synthetic_stack.config["envoy"]["access_log_path"])
    deadline = time.monotonic() + 5  # Envoy flushes its access log about once a second
    while not (mine := [json.loads(line) for line in log.read_text().splitlines() if agent in line]):
        assert time.monotonic() < deadline, "no access log line for the call"
        time.sleep(0.2)
    assert mine[-1]["client_address"] == "127.0.0.1" and mine[-1]["grpc_status"] == "OK"

    cfg = config_mod.with_overrides(
        config_mod.load(synthetic_stack.config_path),
        "envoy",
        listen=f"127.0.0.1:{stack.free_port()}",
        admin_listen=f"127.0.0.1:{stack.free_port()}",
        access_log_path=str(tmp_path / "access.log"),
    )
    boot = envoy_bootstrap.render(cfg)
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm.pop("use_remote_address")  # = false: the address in x-forwarded-for is "the client"
    hcm["internal_address_config"] = {"cidr_ranges": [{"address_prefix": "10.0.0.0", "prefix_len": 8}]}
    (tmp_path / "open.yaml").write_text(yaml.safe_dump(boot))
    proc = stack.start(stack.envoy_command(cfg.envoy, tmp_path / "open.yaml"), log_path=tmp_path / "open.log")
    try:
        stack.wait_healthy(cfg.envoy.listen, 30, service="gateway.v1.Gateway", proc=proc)
        assert stream(cfg.envoy.listen, md=())[-1].done.usage.completion_tokens == 50
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError):  # Envoy's 1 ms timeout: a local reply or a reset stream
            stream(cfg.envoy.listen)
        assert time.monotonic() - t0 < 0.5
    finally:
        stack.stop(proc, 10)


def test_stack_and_cli_end_to_end_and_ctrl_c(tmp_path):
    """igw-stack brings up all three; the igw CLI streams; SIGINT stops all three with exit 0."""
    cfg = make_config("synthetic", worker={"synthetic": {"tokens_per_s": 200}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "stack.log"
    proc = subprocess.Popen(
        [str(BIN / "igw-stack"), "--config", str(path)], stdout=open(log, "wb"), stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while "igw-stack: ready in" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        cli = subprocess.run(
            [str(BIN / "igw"), "--target", cfg["envoy"]["listen"], "--max-tokens", "6", "hello"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.strip() == "lorem ipsum dolor sit amet lorem"
        assert "completion_tokens=6" in cli.stderr and "[length]" in cli.stderr
        bad = subprocess.run(
            [str(BIN / "igw"), "--target", cfg["envoy"]["listen"], "--max-tokens", "0", "hello"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert bad.returncode == 1 and "INVALID_ARGUMENT: sampling.max_tokens" in bad.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    text = log.read_text()
    assert code == 0, text
    for name in ("envoy", "gateway", "worker"):
        assert f"{name} stopped (exit 0)" in text, text
    # Nothing left listening.
    for addr in (cfg["envoy"]["listen"], cfg["gateway"]["listen"], cfg["worker"]["listen"]):
        import socket

        host, port = addr.rsplit(":", 1)
        with socket.socket() as sock:
            assert sock.connect_ex((host, int(port))) != 0, f"{addr} still listening"
