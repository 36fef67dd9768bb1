"""A request's trace: nothing recorded when tracing is off, but a client's trace context still reaches the worker."""

import grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.observe import NullTrace, RequestRecord, RequestTrace, request_trace
from igw_common import tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def _walk(trace) -> dict[str, str]:
    """The calls the request core makes on a trace, in order; returns what goes to the worker."""
    with trace.span("igw.auth"):
        pass
    trace.begin("igw.queue")
    trace.begin("igw.dispatch", worker="w")
    carrier = trace.carrier()
    trace.event("first_token")
    trace.begin("igw.generate")
    rec = RequestRecord(door="grpc")
    rec.code = grpc.StatusCode.OK
    trace.finish(rec)
    return carrier


def test_tracing_off_and_no_client_context_records_and_sends_nothing():
    trace = request_trace(tracing.tracer(None, "igw"), (("user-agent", "x"),))
    assert isinstance(trace, NullTrace)
    assert _walk(trace) == {}


def test_tracing_off_still_carries_a_client_trace_context_to_the_worker():
    trace = request_trace(tracing.tracer(None, "igw"), (("traceparent", PARENT),))
    assert isinstance(trace, RequestTrace)
    assert TRACE_ID in _walk(trace)["traceparent"]


def test_tracing_on_records_the_request_spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace = request_trace(tracing.tracer(None, "igw", provider=provider), (("user-agent", "x"),))
    carrier = _walk(trace)
    names = [s.name for s in exporter.get_finished_spans()]
    assert names == ["igw.auth", "igw.queue", "igw.dispatch", "igw.generate", "igw.execute"]
    assert carrier["traceparent"].split("-")[1] == format(exporter.get_finished_spans()[-1].context.trace_id, "032x")
