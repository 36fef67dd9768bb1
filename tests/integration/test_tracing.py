"""One trace id from the client's traceparent through the gateway into the worker.

Gateway and worker run in this process (real gRPC servers on loopback, the
synthetic engine) so one in-memory span exporter sees both.
"""

from __future__ import annotations

import grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.server import GatewayServer
from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from igw_common import config
from igw_stack.launcher import free_port
from inference.server import WorkerServer, make_engine

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_spans_of_one_call_share_the_client_trace_id():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    worker_addr, gw_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    cfg = config.parse(
        {
            "worker": {
                "listen": worker_addr,
                "engine": "synthetic",
                "metrics_listen": "",
                "synthetic": {"tokens_per_s": 200},
            },
            "gateway": {
                "listen": gw_addr,
                "metrics_listen": "",
                "http_listen": "",
                "workers": [{"address": worker_addr}],
                "drain_notice_s": 0,
                "drain_grace_s": 1,
            },
        }
    )
    engine = make_engine(cfg.worker)
    await engine.start()
    worker = WorkerServer(cfg.worker, engine, tracer_provider=provider)
    await worker.start()
    gateway = GatewayServer(cfg.gateway, tracer_provider=provider)
    await gateway.start()
    try:
        assert await gateway.workers.wait_ready(5)
        async with grpc.aio.insecure_channel(gw_addr) as ch:
            md = [("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01")]
            out = [
                r
                async for r in gpb_grpc.GatewayStub(ch).Execute(
                    gpb.ExecuteRequest(task="hi", sampling=gpb.SamplingParams(max_tokens=3)), metadata=md, timeout=10
                )
            ]
        assert out[-1].done.usage.completion_tokens == 3
    finally:
        await gateway.drain()
        await worker.drain()
        await engine.close()

    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert {"igw.execute", "igw.auth", "igw.queue", "igw.dispatch", "igw.generate", "igw.worker.request"} <= set(spans)
    assert {format(s.context.trace_id, "032x") for s in spans.values()} == {TRACE_ID}
    root = spans["igw.execute"]
    assert format(root.parent.span_id, "016x") == "00f067aa0ba902b7"  # continues the client's span
    for name in ("igw.auth", "igw.queue", "igw.dispatch", "igw.generate"):
        assert spans[name].parent.span_id == root.context.span_id
    # The worker's span is a child of the gateway's dispatch span, across the process boundary.
    assert spans["igw.worker.request"].parent.span_id == spans["igw.dispatch"].context.span_id
    assert [e.name for e in spans["igw.dispatch"].events] == ["first_token"]
    assert [e.name for e in spans["igw.generate"].events] == ["finish"]
    assert spans["igw.worker.request"].attributes["gen_ai.usage.output_tokens"] == 3
    assert root.attributes["rpc.grpc.status_code"] == 0
