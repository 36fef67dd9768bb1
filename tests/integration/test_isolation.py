"""One caller never hurts another (real worker, gateway and Envoy processes, synthetic engine).

Each test reproduces a way one request used to hang, read or cut other
streams sharing the same worker session, and checks that now only the
request at fault is affected, while a stream beside it completes exactly.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from gateway.v1 import gateway_pb2 as gpb
from igw_worker_api.v1 import worker_pb2 as wpb
from igw_worker_api.v1 import worker_pb2_grpc as wpb_grpc
from tests.helpers import build_stack, make_config

DAY_S = 86_400.0


def req(max_tokens=10, task="go", **kw):
    return gpb.ExecuteRequest(task=task, sampling=gpb.SamplingParams(max_tokens=max_tokens), **kw)


def run(stub, request, timeout=60, metadata=None):
    return list(stub.Execute(request, timeout=timeout, metadata=metadata))


def tokens_and_text(responses):
    deltas = [r.delta for r in responses if r.WhichOneof("event") == "delta"]
    return sum(d.tokens for d in deltas), "".join(d.text for d in deltas)


class Canary:
    """A stream of known length running beside the test; it must complete exactly."""

    def __init__(self, stub, max_tokens=60):
        self.stub, self.max_tokens = stub, max_tokens
        self.result = None
        self.error = None
        self.started = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        assert self.started.wait(10), "canary never started"

    def _run(self):
        try:
            out = []
            for r in self.stub.Execute(req(self.max_tokens, task="canary", request_id="canary"), timeout=120):
                out.append(r)
                self.started.set()
            self.result = out
        except grpc.RpcError as err:
            self.error = err
            self.started.set()

    def check(self):
        self._t.join(120)
        assert self.error is None, f"canary failed: {self.error.code()} {self.error.details()}"
        assert self.result[-1].done.usage.completion_tokens == self.max_tokens
        assert tokens_and_text(self.result)[0] == self.max_tokens


def gateway_metric(s, name: str) -> float:
    text = urllib.request.urlopen(f"http://{s.config['gateway']['metrics_listen']}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    cfg = make_config(
        "synthetic",
        worker={"synthetic": {"tokens_per_s": 40, "max_context_tokens": 1_000_000}},
        gateway={"limits": {"max_tokens_limit": 100_000}},
    )
    s = build_stack(tmp_path_factory.mktemp("isolation"), cfg)
    s.start_worker()
    s.start_gateway()
    s.start_envoy()
    yield s
    s.stop()


def test_same_request_id_twice_are_two_independent_requests(stack):
    """The client's id is a label: reusing it neither mixes nor cancels another stream."""
    stub = stack.gateway_stub("envoy")
    first = Canary(stub, max_tokens=40)  # request_id "canary"
    # The same id again, on the same worker session: it must not take over or see the first stream ...
    second = stub.Execute(req(25, task="second", request_id="canary"), timeout=60)
    got = 0
    for r in second:
        if r.WhichOneof("event") == "started":
            assert r.started.request_id == "canary"
        if r.WhichOneof("event") == "delta":
            got += r.delta.tokens
            if got >= 3:
                break
    second.cancel()  # ... and cancelling it must not abort the first.
    first.check()
    third = run(stub, req(7, request_id="canary"))
    assert third[-1].done.usage.completion_tokens == 7 and tokens_and_text(third)[0] == 7
    stack.wait_worker_idle(2)
    assert gateway_metric(stack, "igw_worker_in_flight_requests") == 0  # no capacity drift


def test_deadline_of_months_does_not_break_the_session(stack):
    stub = stack.gateway_stub("envoy")
    canary = Canary(stub)
    far = run(stub, req(5), timeout=120 * DAY_S)  # past uint32 milliseconds (~49.7 days)
    assert far[-1].done.usage.completion_tokens == 5
    canary.check()
    time.sleep(0.2)
    assert gateway_metric(stack, "igw_active_streams") == 0


def test_request_id_with_trailing_newline_is_refused(stack):
    with pytest.raises(grpc.RpcError) as info:
        run(stack.gateway_stub("envoy"), req(2, request_id="abc\n"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("request_id:")


@pytest.mark.parametrize("field", ["model", "role"])
def test_long_names_are_refused_without_echo(stack, field):
    huge = "m" * 200_000
    request = (
        req(2, model=huge)
        if field == "model"
        else gpb.ExecuteRequest(messages=[gpb.ChatMessage(role=huge, content="x")])
    )
    with pytest.raises(grpc.RpcError) as info:
        run(stack.gateway_stub("envoy"), request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(info.value.details()) < 300


def test_context_too_deep_or_not_finite_is_invalid_argument(stack):
    stub = stack.gateway_stub("envoy")
    deep = gpb.ExecuteRequest(task="x")
    node = deep.context
    for _ in range(60):  # far past protobuf's own decode depth
        node = node.fields["a"].struct_value
    medium = gpb.ExecuteRequest(task="x")
    node = medium.context
    for _ in range(20):  # decodable, past gateway.limits.max_context_depth (16)
        node = node.fields["a"].struct_value
    nan = gpb.ExecuteRequest(task="x")
    nan.context.update({"a": [1.0, float("nan")]})
    inf = gpb.ExecuteRequest(task="x")
    inf.context.update({"b": {"c": float("inf")}})
    for request in (deep, medium, nan, inf):
        with pytest.raises(grpc.RpcError) as info:
            run(stub, request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert info.value.details().startswith("context:")


def test_undecodable_bodies_are_invalid_argument(stack):
    with grpc.insecure_channel(stack.envoy) as ch:
        call = ch.unary_stream(
            "/gateway.v1.Gateway/Execute", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        for body in (b"\xff\xff\xff\xff", b"\x0a\x02\xff\xfe", b"\x22\x03\xc3\x28\x41"):
            with pytest.raises(grpc.RpcError) as info:
                list(call(body, timeout=10))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()


def test_oversize_requests_fail_alone(stack):
    """Requests at and over the size budget, through Envoy, while another stream runs on the same session."""
    stub = stack.gateway_stub("envoy")
    canary = Canary(stub)
    # Every field inside its own limit, 4,194,236 bytes in all: over max_prompt_bytes (1 MiB).
    big = gpb.ExecuteRequest(
        task="é" * 16_000, messages=[gpb.ChatMessage(role="user", content="é" * 32_760) for _ in range(63)]
    )
    assert 4_100_000 < big.ByteSize() <= 4_194_304
    with pytest.raises(grpc.RpcError) as info:
        run(stub, big)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in info.value.details()
    # Over the gateway's receive limit (gateway.limits.max_request_bytes, 4 MiB).
    over = gpb.ExecuteRequest(
        task="x", session_id="s", messages=[gpb.ChatMessage(role="user", content="a" * 32_000) for _ in range(64)] * 3
    )
    with pytest.raises(grpc.RpcError) as info:
        run(stub, over)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Just under the prompt limit: served.
    ok = run(
        stub,
        gpb.ExecuteRequest(
            task="x" * 30_000,
            messages=[gpb.ChatMessage(role="user", content="y" * 32_000) for _ in range(30)],
            sampling=gpb.SamplingParams(max_tokens=3),
        ),
    )
    assert ok[-1].done.usage.completion_tokens == 3
    canary.check()
    assert run(stub, req(2))[-1].done.usage.completion_tokens == 2


def test_large_prompts_together_are_split_across_messages(tmp_path):
    """Several large requests at once would make one GatewayMessage over the worker's limit:
    the gateway splits the batch, so all are served and the session survives."""
    cfg = make_config(
        "synthetic",
        worker={
            "max_message_bytes": 4_194_304 + 131_072,
            "synthetic": {"tokens_per_s": 40, "max_context_tokens": 1_000_000},
        },
        gateway={"limits": {"max_request_bytes": 4_000_000}},
    )
    s = build_stack(tmp_path, cfg)
    try:
        s.start_worker()
        s.start_gateway()
        stub = s.gateway_stub("gateway")
        canary = Canary(stub)
        prompt = gpb.ExecuteRequest(
            task="z" * 30_000,
            messages=[gpb.ChatMessage(role="user", content="w" * 32_000) for _ in range(30)],
            sampling=gpb.SamplingParams(max_tokens=4),
        )
        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(lambda _: run(stub, prompt), range(8)))
        assert all(r[-1].done.usage.completion_tokens == 4 for r in results)
        canary.check()
        assert s.worker_load().requests_total == 9
    finally:
        s.stop()


def test_unauthenticated_huge_request_id_stays_out_of_the_log(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys: {}\n")
    cfg = make_config("synthetic", gateway={"auth": {"mode": "api_key", "key_file": str(keys)}})
    s = build_stack(tmp_path, cfg)
    try:
        s.start_worker()
        s.start_gateway()
        with pytest.raises(grpc.RpcError) as info:
            run(s.gateway_stub("gateway"), req(2, request_id="r" * 1_000_000))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        time.sleep(0.3)
        lines = (tmp_path / "gateway.log").read_text().splitlines()
        assert max(len(line) for line in lines) < 4_000
        request_lines = [json.loads(line) for line in lines if '"event": "request"' in line]
        assert request_lines and request_lines[-1]["request_id"] == ""
    finally:
        s.stop()


def test_unavailable_names_no_internal_address(tmp_path):
    cfg = make_config("synthetic")
    s = build_stack(tmp_path, cfg)
    try:
        s.start_gateway()  # its worker is not running
        with pytest.raises(grpc.RpcError) as info:
            run(s.gateway_stub("gateway"), req(2))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert cfg["worker"]["listen"] not in info.value.details()
        assert "Connect" not in info.value.details() and "errno" not in info.value.details().lower()
    finally:
        s.stop()


def test_quiet_session_outlives_keepalive_pings(tmp_path):
    """Gateway->worker and Envoy->gateway connections ping while a request produces nothing (a long
    prefill); the servers must permit it instead of cutting every stream with too_many_pings."""
    cfg = make_config(
        "synthetic",
        worker={"min_ping_interval_ms": 200, "synthetic": {"tokens_per_s": 50, "first_token_delay_ms": 6_000}},
        gateway={"worker_keepalive_ms": 1_000, "min_ping_interval_ms": 200},
        envoy={"upstream_keepalive_ms": 1_000},
    )
    s = build_stack(tmp_path, cfg)
    try:
        s.start_worker()
        s.start_gateway()
        s.start_envoy()
        out = run(s.gateway_stub("envoy"), req(3), timeout=60)
        assert out[-1].done.usage.completion_tokens == 3
        log = (tmp_path / "gateway.log").read_text()
        assert "lost" not in log and "too_many_pings" not in log
    finally:
        s.stop()


def test_small_request_is_not_stuck_behind_one_that_cannot_be_placed(tmp_path):
    """Head-of-line blocking: a request too large for the room the worker has left waits; one that fits
    goes at once. Once the large one gives up (deadline), nothing waits for a wakeup."""
    cfg = make_config(
        "synthetic",
        worker={"synthetic": {"tokens_per_s": 20, "max_batch_tokens": 3_000, "max_context_tokens": 100_000}},
        gateway={"queue": {"max_bypass_ms": 60_000}, "limits": {"max_tokens_limit": 50_000}},
    )
    s = build_stack(tmp_path, cfg)
    try:
        s.start_worker()
        s.start_gateway()
        stub = s.gateway_stub("gateway")
        with ThreadPoolExecutor(4) as ex:
            running = ex.submit(run, stub, req(40))  # holds ~100 tokens for 2 s
            time.sleep(0.5)
            # Needs the whole worker (cost over the 3,000-token room left): waits for it to be idle.
            big = ex.submit(run, stub, req(2_990, task="big " * 500), 1.2)
            time.sleep(0.2)
            t0 = time.monotonic()
            small = run(stub, req(2))
            waited = time.monotonic() - t0
            assert small[-1].done.usage.completion_tokens == 2
            assert waited < 1.0, f"the small request waited {waited:.1f} s behind the large one"
            with pytest.raises(grpc.RpcError) as info:
                big.result()
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert running.result()[-1].done.usage.completion_tokens == 40
    finally:
        s.stop()


def test_reconnect_backoff_starts_over_after_a_session_was_up(tmp_path):
    """Each outage starts at the first backoff step: repeated worker restarts must not leave everyone
    waiting longer each time (0.5 s, 1 s, 2 s, 4 s ... before)."""
    cfg = make_config(
        "synthetic", worker={"synthetic": {"tokens_per_s": 200}}, gateway={"worker_reconnect_backoff_ms": 300}
    )
    s = build_stack(tmp_path, cfg)
    try:
        s.start_worker()
        s.start_gateway()
        stub = s.gateway_stub("gateway")
        assert run(stub, req(2))[-1].done.usage.completion_tokens == 2
        lags = []
        for _ in range(6):
            s.procs.pop("worker").kill()
            time.sleep(0.3)
            s.start_worker()  # healthy when this returns
            t0 = time.monotonic()
            while True:
                try:
                    run(stub, req(1), timeout=5)
                    break
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE
                    time.sleep(0.05)
            lags.append(time.monotonic() - t0)
        # With the backoff reset, each lag is at most about one first step; without it the 6th is ~9 s.
        assert max(lags) < 1.5, lags
    finally:
        s.stop()


def test_worker_renders_off_its_event_loop(tmp_path):
    """A prompt that takes long to render must not stall the frames of another session's stream."""
    import asyncio

    from igw_common import config
    from igw_stack.launcher import free_port
    from inference.server import WorkerServer
    from inference.synthetic_engine import SyntheticEngine

    threads = []

    class SlowRender(SyntheticEngine):
        def render(self, messages, tools=None):
            threads.append(threading.current_thread().name)
            if messages[-1]["content"] == "slow":
                time.sleep(1.0)  # stands in for a template + tokenizer on a megabyte prompt
            return super().render(messages, tools)

    async def main():
        addr = f"127.0.0.1:{free_port()}"
        wcfg = config.parse(
            {"worker": {"listen": addr, "engine": "synthetic", "metrics_listen": "", "synthetic": {"tokens_per_s": 50}}}
        ).worker
        engine = SlowRender(wcfg.model_name, wcfg.synthetic)
        server = WorkerServer(wcfg, engine)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(addr) as ch:
                stub = wpb_grpc.WorkerStub(ch)
                fast, slow = stub.Session(), stub.Session()
                await fast.write(
                    wpb.GatewayMessage(
                        submits=[
                            wpb.Submit(
                                request_id="1",
                                model=engine.model,
                                messages=[wpb.ChatMessage(role="user", content="fast")],
                                sampling=wpb.Sampling(max_tokens=40),
                            )
                        ]
                    )
                )
                arrivals = []

                async def read_fast():
                    async for frame in fast:
                        for ev in frame.events:
                            if ev.WhichOneof("kind") == "delta":
                                arrivals.append(time.monotonic())
                            if ev.WhichOneof("kind") == "finished":
                                return

                reader = asyncio.create_task(read_fast())
                await asyncio.sleep(0.2)
                await slow.write(
                    wpb.GatewayMessage(
                        submits=[
                            wpb.Submit(
                                request_id="1",
                                model=engine.model,
                                messages=[wpb.ChatMessage(role="user", content="slow")],
                                sampling=wpb.Sampling(max_tokens=1),
                            )
                        ]
                    )
                )
                await reader
                gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
                return max(gaps)
        finally:
            await server.drain()

    max_gap = asyncio.run(main())
    assert all(name.startswith("render") for name in threads)
    assert max_gap < 0.5, f"the fast stream stalled {max_gap:.2f} s while another prompt rendered"
