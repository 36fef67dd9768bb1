"""Redis for the state that outlives a stream (response cache, sessions, jobs): clients and one error type.

Quotas have their own store (``gateway.state.quota.redis_store``) with its failure policy; these features
each decide what a Redis failure means for them (the cache treats it as a miss, a session turn fails
with UNAVAILABLE, a job call fails with UNAVAILABLE), so all they need here is a client with bounded
waits and every failure folded into ``StateUnavailable``.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


class StateUnavailable(Exception):
    """Redis did not answer in time, or refused the call (read-only replica, out of memory, ...)."""


def client(url: str, timeout_s: float, blocking_s: float = 0.0) -> aioredis.Redis:
    """A client whose calls give up after ``timeout_s``; ``blocking_s``: for a client that also sends
    blocking reads (XREAD BLOCK) of up to that long, whose socket must wait longer."""
    return aioredis.from_url(
        url,
        socket_timeout=timeout_s + blocking_s,
        socket_connect_timeout=timeout_s,
        # One immediate retry on a broken pooled connection (Redis restarted), none after a timeout.
        retry=Retry(NoBackoff(), 1, supported_errors=(rexc.ConnectionError,)),
    )


async def call(what: str, timeout_s: float, coro_fn):
    """Run ``coro_fn()`` within ``timeout_s``; any Redis failure becomes ``StateUnavailable``."""
    try:
        async with asyncio.timeout(timeout_s):
            return await coro_fn()
    except (rexc.RedisError, OSError, TimeoutError) as err:
        kind = "timed out" if isinstance(err, (TimeoutError, rexc.TimeoutError)) else type(err).__name__
        detail = str(err).split("\n", 1)[0][:120] if isinstance(err, rexc.ResponseError) else ""
        raise StateUnavailable(f"Redis {what}: {kind} {detail}".rstrip()) from None


def esc(s: str) -> str:
    """A client-chosen string inside a key: injective, and no '{' or '}' to end a hash tag early."""
    return quote(s, safe="")
