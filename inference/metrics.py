"""Prometheus metrics of a worker, served on ``worker.metrics_listen``.

Counters are read at scrape time from the worker's own ``Counters`` (the same
numbers the Load RPC reports), so there is one bookkeeping, not two.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_ABORT = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class WorkerMetrics:
    def __init__(self, counters, engine, max_concurrent_requests: int):
        self.registry = CollectorRegistry()
        self._counters, self._engine, self._capacity = counters, engine, max_concurrent_requests
        self.registry.register(self)
        self.abort_latency = Histogram(
            "igw_worker_abort_seconds",
            "Time from an abort (cancel, timeout, session end) to the engine releasing the request.",
            buckets=_ABORT,
            registry=self.registry,
        )

    def collect(self):
        c = self._counters
        yield CounterMetricFamily("igw_worker_requests", "Requests received.", value=c.requests_total)
        yield CounterMetricFamily(
            "igw_worker_requests_aborted",
            "Requests ended by cancel, timeout or session end.",
            value=c.requests_aborted_total,
        )
        yield CounterMetricFamily(
            "igw_worker_completion_tokens",
            "Tokens generated (OTel GenAI: gen_ai.token.type=output).",
            value=c.completion_tokens_total,
        )
        yield CounterMetricFamily(
            "igw_worker_frames", "Frames sent to gateways (one per engine step with output).", value=c.frames_sent_total
        )
        yield GaugeMetricFamily("igw_worker_active_requests", "Requests in the engine now.", value=c.active_requests)
        yield GaugeMetricFamily(
            "igw_worker_engine_unfinished_requests",
            "Requests the engine itself still tracks (vLLM's own count).",
            value=self._engine.unfinished_requests(),
        )
        yield GaugeMetricFamily(
            "igw_worker_load_ratio",
            "Active requests / max_concurrent_requests.",
            value=c.active_requests / max(1, self._capacity),
        )

    def serve(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host, registry=self.registry)
