"""What one request leaves behind for operators: its spans and its one JSON log line.

Metrics are observed where the state they count changes (queue wait at the
grant, TTFT at the first token, inter-token latency as tokens arrive, in
``gateway.core.run`` and ``gateway.workers.streaming``); this module holds the span
tree of a request and the log line written when it ends.

Spans are passed explicitly rather than made "current": the request core is
an async generator, and attaching contexts across its yields is fragile.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field

import grpc

from gateway.errors import clip
from igw_common import tracing

request_log = logging.getLogger("gateway.requests")  # one line per finished request

_ids = itertools.count(1)


@dataclass
class RequestRecord:
    """What the log line and metrics say about one call. Client-sent values enter only once validated."""

    door: str  # "grpc", "http" or "job"
    id: str = field(default_factory=lambda: f"{next(_ids)}")  # ours, for correlating log lines
    request_id: str = ""  # the client's label, once validated
    tenant: str = ""
    tenant_label: str = ""  # bounded: the tenant, or "other" for tenants the key file does not name
    key_id: str = ""
    model: str = ""
    priority: str = ""
    finish_reason: str = ""
    pool: str = ""
    worker: str = ""
    code: grpc.StatusCode = grpc.StatusCode.OK
    reason: str = ""
    started: float = field(default_factory=time.monotonic)
    task_excerpt: str = ""  # only with gateway.log_prompts
    cache: str = ""  # "hit" or "miss" for a cacheable request (gateway.state.cache), else ""
    cost_micros: int = 0  # micro-units of gateway.pricing.currency
    session_turns_dropped: int = 0
    resumes: int = 0  # times the request went on on another worker after its worker was lost mid-answer
    usage: tuple[int, int] | None = None  # (prompt, completion) tokens of an answer that had no stream (a hit)

    def log_line(self, stream) -> None:
        if not request_log.isEnabledFor(logging.INFO):  # gateway.log_level above info: nothing to build
            return
        fields = {
            "event": "request",
            "id": self.id,
            "door": self.door,
            "request_id": self.request_id,
            "tenant": self.tenant,
            "key_id": self.key_id,
            "model": self.model,
            "priority": self.priority,
            "pool": self.pool,
            "worker": self.worker,
            "status": self.code.name,
            "finish_reason": self.finish_reason,
            "reason": self.reason,
        }
        if stream is not None:
            fields.update(
                prompt_tokens=stream.prompt_tokens,
                cached_prompt_tokens=stream.cached_prompt_tokens,
                completion_tokens=stream.completion_tokens,
                queue_ms=stream.ms_since_created(stream.dispatched_at) if stream.dispatched_at else None,
                ttft_ms=stream.ms_since_created(stream.first_token_at) if stream.first_token_at else None,
            )
        elif self.usage is not None:
            fields.update(prompt_tokens=self.usage[0], completion_tokens=self.usage[1])
        fields["cost_micros"] = self.cost_micros
        if self.cache:
            fields["cache"] = self.cache
        if self.session_turns_dropped:
            fields["session_turns_dropped"] = self.session_turns_dropped
        if self.resumes:
            fields["resumes"] = self.resumes
        fields["total_ms"] = max(0, round((time.monotonic() - self.started) * 1000))
        if self.task_excerpt:
            fields["task"] = self.task_excerpt
        request_log.info("request %s %s", self.id, self.code.name, extra={"fields": fields})


def excerpt(text: str) -> str:
    """What `gateway.log_prompts` writes of a prompt: enough to debug with, never unbounded."""
    return clip(text, 4096)


def request_trace(tracer, metadata) -> RequestTrace | NullTrace:
    """The spans of one request, or none when tracing is off and the caller sent no trace context to carry
    on to the worker (the no-op tracer's spans would still cost a few objects each, per request)."""
    if isinstance(tracer, tracing.NoOpTracer) and not tracing.has_context(metadata):
        return NullTrace()
    return RequestTrace(tracer, metadata)


class NullTrace:
    """RequestTrace's interface, recording nothing."""

    current_name = ""
    _nothing = contextlib.nullcontext()

    def begin(self, name: str, **attrs) -> None:
        pass

    def span(self, name: str):
        return self._nothing

    def event(self, name: str, **attrs) -> None:
        pass

    def carrier(self) -> dict[str, str]:
        return {}

    def finish(self, rec: RequestRecord) -> None:
        pass


class RequestTrace:
    """The spans of one request: igw.execute with children auth, queue, dispatch, generate."""

    def __init__(self, tracer, metadata):
        self.root = tracer.start_span("igw.execute", context=tracing.extract(metadata), kind=tracing.SpanKind.SERVER)
        self._tracer = tracer
        self._ctx = tracing.set_span_in_context(self.root)
        self._child = None
        self.current_name = ""

    def begin(self, name: str, **attrs) -> None:
        """End the current phase's span and start the next."""
        if self._child is not None:
            self._child.end()
        self._child = self._tracer.start_span(name, context=self._ctx, attributes=attrs)
        self.current_name = name

    @contextlib.contextmanager
    def span(self, name: str):
        self.begin(name)
        yield
        self._child.end()
        self._child, self.current_name = None, ""

    def event(self, name: str, **attrs) -> None:
        (self._child or self.root).add_event(name, attrs)

    def carrier(self) -> dict[str, str]:
        return tracing.inject(self._child or self.root)

    def finish(self, rec: RequestRecord) -> None:
        if self._child is not None:
            self._child.end()
        self.root.set_attribute("igw.id", rec.id)
        if rec.request_id:
            self.root.set_attribute("igw.request_id", rec.request_id)
        self.root.set_attribute("igw.tenant", rec.tenant)
        self.root.set_attribute("gen_ai.request.model", rec.model)
        self.root.set_attribute("rpc.grpc.status_code", rec.code.value[0])
        self.root.end()
