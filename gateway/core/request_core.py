"""The request core: what every door calls, and the parts a request shares with every other one.

A door reads its wire format into a ``RequestDraft`` (or the error that reading met) and hands it to
``run``, which authenticates the caller, validates the draft with the one validator and walks the
request through its steps (``gateway.core.run.Run``). The door maps the events that come back
(``Started``, ``Delta``, ``Done``) and any ``RpcError`` to its own wire format. Whatever one door gets
(auth, quotas, priority, fairness, deadlines, supersession, cancel, the cache and sessions, metrics,
the log line, traces), every door gets.

Background jobs (``gateway.doors.job_runner``) run through ``run`` too, with the principal that
submitted them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from gateway.core import admission
from gateway.core.auth import Authenticator, Principal
from gateway.core.events import Event
from gateway.core.placement import Placement
from gateway.core.run import Run
from gateway.core.scheduler import Scheduler
from gateway.core.supersession import Supersession
from gateway.core.validation import validate
from gateway.errors import RpcError
from gateway.metrics import GatewayMetrics
from gateway.request import RequestDraft, ValidRequest
from gateway.state.cache import ResponseCache
from gateway.state.quota import Budget, Pricing, Quotas
from gateway.state.sessions import Sessions
from gateway.workers.membership import WorkerSet
from gateway.workers.streaming import Pacer
from igw_common.config import GatewayConfig


class RequestCore:
    def __init__(
        self,
        cfg: GatewayConfig,
        workers: WorkerSet,
        placement: Placement,
        auth: Authenticator,
        quotas: Quotas,
        scheduler: Scheduler,
        metrics: GatewayMetrics,
        tracer,
        pricing: Pricing | None = None,
        cache: ResponseCache | None = None,
        sessions: Sessions | None = None,
    ):
        self.cfg = cfg
        self.workers = workers
        self.placement = placement
        self.auth = auth
        self.quotas = quotas
        self.scheduler = scheduler
        self.metrics = metrics
        self.tracer = tracer
        self.supersession = Supersession(scheduler)
        self.pacer = Pacer()
        self.pricing = pricing or Pricing(cfg.pricing, cfg.pools)
        self.cache = cache  # None: gateway.cache.enabled is off
        self.sessions = sessions  # None: gateway.sessions.enabled is off

    def run(
        self,
        headers,
        reading: RequestDraft | RpcError,
        deadline: float | None,
        door: str,
        principal: Principal | None = None,
    ) -> AsyncIterator[Event]:
        """Run one request. ``headers``: the caller's metadata (lower-case names); ``reading``: the door's
        draft, or the error its wire format met; ``deadline``: event-loop time or None; ``principal``:
        the caller when it was authenticated earlier (a job runs as whoever submitted it). Raises
        ``RpcError`` for every refusal or failure; the caller must close the generator
        (``contextlib.aclosing``) so an abandoned request is aborted at once."""
        return Run(self, headers, deadline, door).events(reading, principal)

    def authenticate(self, headers) -> Principal:
        return self.auth.authenticate(headers)

    def validate(self, draft: RequestDraft) -> ValidRequest:
        """The one validator, for a door that must check a request before it runs (SubmitJob)."""
        return validate(draft, self.cfg.limits)

    def budgets(self, principal: Principal) -> list[Budget]:
        """The quota budgets a caller is subject to: its key's (if any) and its tenant's."""
        return admission.budgets(self.cfg, self.pricing.currency, principal)
