"""OpenTelemetry tracing for the gateway and the worker (off by default).

The W3C ``traceparent`` a client sends in its metadata is continued by the
gateway, whose spans (auth, queue, dispatch, generate) are children of one
``igw.execute`` span, and carried to the worker in ``Submit.trace_context``,
where ``igw.worker.request`` continues it: one trace id from client to engine.
The exporter (OTLP over gRPC, or console) is chosen in the config.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import NoOpTracer, NoOpTracerProvider, SpanKind  # noqa: F401  (re-exported for callers)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


def tracer(cfg, service_name: str, provider=None) -> trace.Tracer:
    """A tracer for ``service_name``: from ``provider`` if given (tests), else as configured."""
    if provider is None:
        if cfg is None or not cfg.enabled:
            return NoOpTracerProvider().get_tracer("igw")
        provider = _make_provider(cfg, service_name)
    return provider.get_tracer("igw")


def _make_provider(cfg, service_name: str):
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if cfg.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=cfg.otlp_endpoint, insecure=cfg.otlp_endpoint.startswith("http://"))
    else:
        exporter = ConsoleSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def extract(carrier) -> trace.Context | None:
    """The trace context in gRPC metadata or a map of W3C headers (None: start a new trace)."""
    items = carrier.items() if hasattr(carrier, "items") else carrier or ()
    headers = {k.lower(): v for k, v in items if isinstance(v, str)}
    return _PROPAGATOR.extract(headers) if "traceparent" in headers else None


def has_context(carrier) -> bool:
    """Whether gRPC metadata or a map of W3C headers carries a ``traceparent``."""
    items = carrier.items() if hasattr(carrier, "items") else carrier or ()
    return any(k.lower() == "traceparent" for k, _ in items)


def inject(span) -> dict[str, str]:
    """W3C headers for ``span``, to carry it to the worker."""
    out: dict[str, str] = {}
    _PROPAGATOR.inject(out, context=trace.set_span_in_context(span))
    return out


set_span_in_context = trace.set_span_in_context
