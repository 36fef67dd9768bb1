"""Quotas: requests per minute, tokens per minute and concurrent streams.

Each limit is a token bucket whose capacity is the per-minute figure and
which refills continuously at figure/60 per second, so a client can burst up
to its minute's budget and then proceeds at the steady rate. Concurrent
streams are leases, renewed while their stream runs and expiring after
``gateway.quota.lease_ttl_s`` should a gateway die without releasing them.

Spend budgets (per UTC day and month, ``spend_per_day``/``spend_per_month``) ride on the same
reservation: the cost of prompt + ``max_tokens`` at the model's price (``pricing``) is reserved with
the tokens, trimmed with them, and settled to the real cost; Redis checks and charges every window of
every budget in the same script as the buckets.

Exactness: at admission, one call reserves *everything* a request may use
on every budget it is subject to (key and tenant): one request, and
``prompt_tokens + max_tokens`` tokens. Either all budgets have room and all
are charged, or nothing is charged and the caller learns how long to wait.
The prompt is not tokenized yet at admission, so the reservation uses an
upper bound (UTF-8 bytes + template overhead; a token is at least one byte)
and is trimmed to the real prompt when the worker accepts the request. At the
end the unused part of ``max_tokens`` is refunded. A stream can therefore
never overshoot its budget, and concurrent requests can never all pass on
the same remaining budget.

Modules:

- ``policy``: ``Quotas``, the facade (failure mode, cancel-safe reserve,
  background retries, lease renewal);
- ``local``: ``LocalStore``, in-process (the embedded default and the
  fail-open fallback; atomic because it runs on one event loop without
  awaiting);
- ``redis_store``: ``RedisStore``, one Lua script per operation
  (``lua/*.lua`` behind a shared prelude), atomic on the Redis server, so
  several gateway replicas share one budget exactly, on Redis's own clock;
- ``base``: budgets, outcomes and the store interface;
- ``pricing``: what a request costs (integer micro-units of the currency) and the spend windows.
"""

from gateway.state.quota.base import KINDS, Budget, Denied, Remaining, Reservation, Store, StoreUnavailable, Violation
from gateway.state.quota.local import LocalStore
from gateway.state.quota.policy import Quotas, prompt_token_bound
from gateway.state.quota.pricing import MICROS, Pricing, Window, format_micros, window_at
from gateway.state.quota.redis_store import RedisStore

__all__ = [
    "KINDS",
    "Budget",
    "Denied",
    "LocalStore",
    "MICROS",
    "Pricing",
    "Quotas",
    "RedisStore",
    "Remaining",
    "Reservation",
    "Store",
    "StoreUnavailable",
    "Violation",
    "Window",
    "format_micros",
    "prompt_token_bound",
    "window_at",
]
