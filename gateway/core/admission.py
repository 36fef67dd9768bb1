"""What lets an authenticated, valid request in: its scheduling class, its model, and its quota.

- ``scheduling_class``: the class asked for, within the API key's cap;
- ``admit_model``: a model the worker set serves, the caller may use, whose context window leaves
  room for a prompt beside ``max_tokens``;
- ``budgets`` and ``reserve``: the key's and the tenant's quota budgets, and one atomic reservation
  against both, with refusals as the statuses a client acts on.
"""

from __future__ import annotations

from gateway.core.auth import Principal
from gateway.errors import (
    invalid_argument,
    model_not_found,
    permission_denied,
    resource_exhausted,
    unavailable,
)
from gateway.request import ValidRequest
from gateway.state.quota import Budget, Denied, Quotas, Reservation, StoreUnavailable
from gateway.vocabulary import priority_allowed
from gateway.workers.membership import WorkerSet
from igw_common.config import NO_LIMITS, GatewayConfig


def scheduling_class(principal: Principal, asked: str | None) -> str:
    """The class asked for, or the key's cap when unset; above the cap is PERMISSION_DENIED."""
    if asked is None:
        return principal.priority_max
    if not priority_allowed(asked, principal.priority_max):
        cap = principal.priority_max
        raise permission_denied(f"priority: this API key may only send {cap} requests (its priority_max is {cap})")
    return asked


def admit_model(workers: WorkerSet, principal: Principal, valid: ValidRequest) -> str:
    """The model that serves the request: one the worker set serves, the caller may use, and whose
    context window leaves room for a prompt next to max_tokens."""
    models = workers.models()
    model = valid.model or workers.default_model()
    if model not in models:
        if not model or not workers.all_reached():
            # A worker we never reached might serve it: do not claim it does not exist.
            raise workers.no_worker_error(model)
        raise model_not_found(model, sorted(models))
    if not models[model]:
        raise workers.no_worker_error(model)
    if not principal.may_use(model):
        who = f"API key {principal.key_id}" if principal.key_id else f"tenant {principal.tenant}"
        raise permission_denied(
            f"model: {who} may not use model {model!r}; it may use {', '.join(sorted(principal.models))}"
        )
    if valid.suffix and not workers.fill_in_middle(model):
        raise invalid_argument(
            "suffix", f"model {model} has no fill-in-the-middle tokens; send the prompt without a suffix"
        )
    window = workers.max_context_tokens(model)
    max_tokens = valid.sampling.max_tokens
    if max_tokens >= window and not valid.sampling.fit_context:
        source = "sampling.max_tokens" if valid.max_tokens_was_set else "gateway.limits.default_max_tokens (config)"
        raise invalid_argument(
            "sampling.max_tokens",
            f"{max_tokens} tokens leaves no room for the prompt in model {model}'s {window}-token context "
            f"(from {source}); ask for fewer",
        )
    return model


def budgets(cfg: GatewayConfig, currency: str, principal: Principal) -> list[Budget]:
    """The quota budgets a caller is subject to: its key's (if any) and its tenant's."""
    out = []
    if principal.key_id:
        limits = principal.key_limits
        if limits == NO_LIMITS:
            limits = cfg.quota.default_key_limits
        out.append(Budget("key", principal.key_id, limits, principal.tenant, currency))
    limits = principal.tenant_limits
    if limits == NO_LIMITS:
        limits = cfg.quota.default_tenant_limits
    out.append(Budget("tenant", principal.tenant, limits, principal.tenant, currency))
    return out


async def reserve(quotas: Quotas, budgets: list[Budget], tokens: int, cost: int = 0) -> Reservation | None:
    """One request plus ``tokens`` and ``cost`` against every budget at once, or the refusal."""
    try:
        return await quotas.reserve(budgets, tokens, cost)
    except Denied as denied:
        raise resource_exhausted(
            f"quota exceeded: {denied}",
            denied.retry_after_s,
            [(v.budget.subject, v.description) for v in denied.violations],
            reason="quota_" + denied.violations[0].kind,
        ) from None
    except StoreUnavailable:
        raise unavailable(
            "the quota store is unreachable and this gateway fails closed; retry shortly", 1.0, reason="quota_store"
        ) from None
