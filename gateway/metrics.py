"""Prometheus metrics of the gateway (prometheus-client), served on ``gateway.metrics_listen``.

Names follow Prometheus conventions (base units, ``_total`` counters,
``_seconds`` histograms). Where OpenTelemetry's GenAI semantic conventions
name the same quantity, the help text says which. Labels never carry a key,
a hash or prompt text: tenant and key id at most.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase

# Latency buckets from 5 ms to 60 s: interactive completions care about the low end.
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


def _keep_children(metric: MetricWrapperBase) -> None:
    """Make ``metric.labels(...)`` answer a child it has handed out before from a dict: prometheus-client
    converts, checks and locks on every call, and a request asks for about eight children. Bounded like
    the metric itself (label values are never a client's own strings, see above)."""
    children: dict[tuple, MetricWrapperBase] = {}
    make = metric.labels

    def labels(*values, **named):
        if named:
            return make(*values, **named)
        child = children.get(values)
        if child is None:
            child = children[values] = make(*values)
        return child

    metric.labels = labels


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "igw_requests",
            'Execute calls by final gRPC status code and worker pool ("" if refused before a pool).',
            ["model", "tenant", "code", "pool"],
            registry=r,
        )
        self.ttft = Histogram(
            "igw_time_to_first_token_seconds",
            "Time from receiving a request to its first generated token "
            "(OTel GenAI: gen_ai.server.time_to_first_token).",
            ["model", "pool"],
            buckets=_LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            "igw_inter_token_latency_seconds",
            "Time between successive tokens of a stream, per token, as the gateway receives them "
            "(OTel GenAI: gen_ai.server.time_per_output_token).",
            ["model"],
            buckets=_ITL,
            registry=r,
        )
        self.queue_wait = Histogram(
            "igw_queue_wait_seconds",
            "Time a request waited in the admission queue for a worker.",
            ["model", "priority"],
            buckets=_LATENCY,
            registry=r,
        )
        self.duration = Histogram(
            "igw_request_duration_seconds",
            "Time from receiving a request to the end of its stream (OTel GenAI: gen_ai.server.request.duration).",
            ["model", "pool"],
            buckets=_LATENCY,
            registry=r,
        )
        self.tokens = Counter(
            "igw_tokens",
            "Tokens used, by type input (prompt) or output (completion) "
            "(OTel GenAI: gen_ai.client.token.usage with gen_ai.token.type).",
            ["tenant", "model", "type"],
            registry=r,
        )
        self.active_streams = Gauge(
            "igw_active_streams", "Execute streams open now (queued or generating).", registry=r
        )
        self.queue_depth = Gauge("igw_queue_depth", "Requests waiting for a worker.", ["priority"], registry=r)
        self.queue_limit = Gauge("igw_queue_limit", "Requests that may wait (gateway.queue.max_queued).", registry=r)
        # gateway.native_relay: what this process's relay holds, as of its last ping (every
        # core_timeout_ms / 4). Each table goes back to 0 with the load; one that does not is a leak.
        self.relay_calls = Gauge(
            "igw_native_relay_calls", "Client Execute calls the native relay holds open.", registry=r
        )
        self.relay_bound_requests = Gauge(
            "igw_native_relay_bound_requests",
            "Requests whose tokens the native relay writes to a client call now.",
            registry=r,
        )
        self.relay_worker_streams = Gauge(
            "igw_native_relay_worker_streams", "Session streams the native relay holds to workers.", registry=r
        )
        self.relay_resident_bytes = Gauge(
            "igw_native_relay_resident_memory_bytes", "The native relay process's resident memory.", registry=r
        )
        self.rejections = Counter(
            "igw_rejections",
            "Requests refused before reaching a worker, by reason "
            "(quota_requests, quota_tokens, quota_concurrent, queue_full, unauthenticated, permission_denied, "
            "invalid_argument, no_worker).",
            ["reason", "tenant"],
            registry=r,
        )
        self.aborts = Counter(
            "igw_aborts",
            "Requests aborted on a worker, by reason (cancelled, deadline, worker_lost).",
            ["reason"],
            registry=r,
        )
        self.abort_latency = Histogram(
            "igw_abort_latency_seconds",
            "Time from sending a cancel to the worker confirming the abort.",
            buckets=_ITL,
            registry=r,
        )
        self.tokens_after_cancel = Counter(
            "igw_tokens_after_cancel",
            "Tokens a worker generated for a request after the gateway cancelled it.",
            registry=r,
        )
        self.superseded = Counter(
            "igw_superseded",
            "Requests replaced by a newer one with the same supersede key (queued or generating).",
            registry=r,
        )
        self.resumes = Counter(
            "igw_resumes",
            "Requests continued on another worker from the tokens already sent, after theirs was lost mid-answer.",
            registry=r,
        )
        self.placements = Counter(
            "igw_placements",
            "Requests placed on a worker, by how the worker was chosen (kv_cache: by cached prefix against "
            "load; affinity: session or prefix history, else least loaded; least_loaded).",
            ["strategy"],
            registry=r,
        )
        self.overflows = Counter(
            "igw_overflow",
            "Requests placed on an overflow pool (gateway.pools[].overflow), by pool and why (queue_time: the other "
            "pools could not take it within gateway.overflow.after_queue_ms; no_primary: none of their workers was "
            "up).",
            ["pool", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "igw_retries", "Requests placed again after their worker failed before the first token.", registry=r
        )
        self.quota_store_failures = Counter(
            "igw_quota_store_failures", "Calls to the shared quota store (Redis) that failed.", registry=r
        )
        self.cost = Counter(
            "igw_cost",
            "What requests cost, in units of gateway.pricing.currency (prompt and completion tokens at the "
            "model's prices; cache hits as gateway.cache.hit_charge says).",
            ["tenant", "model"],
            registry=r,
        )
        self.cache_hits = Counter(
            "igw_cache_hits", "Requests answered from the response cache (no worker ran).", ["model"], registry=r
        )
        self.cache_misses = Counter(
            "igw_cache_misses",
            "Cacheable requests the cache could not answer (generated, then stored).",
            ["model"],
            registry=r,
        )
        self.cache_bytes = Counter(
            "igw_cache_bytes",
            "Bytes of cached answers, by direction: stored (written) or served (read for a hit).",
            ["direction"],
            registry=r,
        )
        self.cache_evictions = Counter(
            "igw_cache_evictions",
            "Answers dropped or never stored, by reason: capacity (memory store full, least recently used), "
            "expired (memory store), too_large (over gateway.cache.max_entry_bytes).",
            ["reason"],
            registry=r,
        )
        self.cache_memory_bytes = Gauge(
            "igw_cache_memory_bytes", "Bytes held by the in-process response cache (store memory).", registry=r
        )
        self.session_turns_dropped = Counter(
            "igw_session_turns_dropped",
            "Oldest turns trimmed from server-side sessions to fit the model's context or the session limits.",
            registry=r,
        )
        self.state_store_failures = Counter(
            "igw_state_store_failures",
            "Redis calls of the cache, sessions or jobs that failed or timed out, by feature.",
            ["feature"],
            registry=r,
        )
        self.jobs = Counter(
            "igw_jobs",
            "Job events on this gateway, by outcome: submitted, started, rerun (a run after a gateway died or "
            "a transient refusal), succeeded, failed, refused_stale (a finished run that was no longer the "
            "job's current one: not recorded).",
            ["outcome"],
            registry=r,
        )
        self.jobs_running = Gauge("igw_jobs_running", "Jobs this gateway is running now.", registry=r)
        self.jobs_queued = Gauge(
            "igw_jobs_queued", "Jobs waiting or running in the shared queue (every gateway sees the same).", registry=r
        )
        for metric in vars(self).values():
            if isinstance(metric, MetricWrapperBase) and metric._labelnames:
                _keep_children(metric)

    def serve(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host, registry=self.registry)


class PoolCollector:
    """Worker health and load, read from the pool at scrape time (workers come and go with DNS)."""

    def __init__(self, workers):
        self.workers = workers

    def collect(self):
        up = GaugeMetricFamily(
            "igw_worker_up", "1 if the worker is connected and not draining, else 0.", labels=["worker", "pool"]
        )
        in_flight = GaugeMetricFamily(
            "igw_worker_in_flight_requests", "This gateway's requests on the worker.", labels=["worker"]
        )
        outstanding = GaugeMetricFamily(
            "igw_worker_outstanding_tokens",
            "Prompt + max_tokens of this gateway's requests on the worker.",
            labels=["worker"],
        )
        cached = GaugeMetricFamily(
            "igw_worker_cached_blocks",
            "Prefix-cache blocks the gateway knows the worker's engine holds (from its KV events; "
            "gateway.placement), 0 for a worker that reports none.",
            labels=["worker"],
        )
        for w in list(self.workers.workers):
            up.add_metric([w.address, w.pool], 1.0 if w.ready and not w.draining else 0.0)
            in_flight.add_metric([w.address], w.in_flight)
            outstanding.add_metric([w.address], w.outstanding_tokens)
            cached.add_metric([w.address], len(w.kv))
        yield from (up, in_flight, outstanding, cached)
