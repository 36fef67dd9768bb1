"""The response cache itself: which requests are cacheable, their key, the stored answer, and the
single flight of identical misses (the module docstring of ``gateway.state.cache`` tells how)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass

from gateway.request import ValidRequest
from gateway.state.cache.store import MemoryStore, RedisStore
from gateway.state.redis import StateUnavailable, esc
from igw_common.config import CacheConfig

log = logging.getLogger("gateway.state.cache")

POLL_S = 0.025  # how often a waiter on another replica's lock looks for the answer
_PIECE_OVERHEAD = 8  # bytes a stored delta costs beside its text (JSON brackets, the count)


def deterministic(valid: ValidRequest) -> bool:
    s = valid.sampling
    return (s.HasField("temperature") and s.temperature == 0.0) or s.HasField("seed")


def digest(model: str, valid: ValidRequest, messages) -> str:
    """SHA-256 over everything the worker sees, each part length-prefixed (no two requests share a
    serialization)."""
    h = hashlib.sha256()

    def part(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)

    part(b"igw-cache-v2")
    part(model.encode())
    part(str(len(messages)).encode())
    for m in messages:  # with tool calls and results
        part(m.SerializeToString(deterministic=True))
    part(valid.prompt.encode())
    part(valid.suffix.encode())
    part(valid.sampling.SerializeToString(deterministic=True))
    part(valid.constraint.SerializeToString(deterministic=True) if valid.constraint is not None else b"")
    tools = valid.tools
    part(b"" if tools is None else f"{tools.choice}:{tools.name}:{tools.parallel:d}".encode())
    for t in tools.tools if tools is not None else ():
        part(t.SerializeToString(deterministic=True))
    return h.hexdigest()


@dataclass
class Entry:
    """A cached answer."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    pieces: list[tuple[str, int]]  # (text, tokens) of each delta as it was streamed

    def encode(self) -> bytes:
        return json.dumps(
            {
                "v": 1,
                "model": self.model,
                "pt": self.prompt_tokens,
                "ct": self.completion_tokens,
                "fr": self.finish_reason,
                "p": self.pieces,
            },
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Entry | None:
        try:
            d = json.loads(data)
            if d.get("v") != 1:
                return None
            return cls(d["model"], int(d["pt"]), int(d["ct"]), str(d["fr"]), [(str(t), int(n)) for t, n in d["p"]])
        except (ValueError, KeyError, TypeError):
            return None  # written by another version: a miss, overwritten by this answer

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.pieces)


class Flight:
    """One miss being generated: records its deltas, then stores the answer (or gives way to a waiter)."""

    def __init__(self, cache: ResponseCache, key: str, future: asyncio.Future | None, token: str | None):
        self.cache, self.key = cache, key
        self._future, self._token = future, token
        self.pieces: list[tuple[str, int]] = []
        self._size = 0
        self.too_large = False
        self.done = False

    def add(self, text: str, tokens: int) -> None:
        if self.too_large:
            return
        self.pieces.append((text, tokens))
        self._size += len(text.encode()) + _PIECE_OVERHEAD
        if self._size > self.cache.cfg.max_entry_bytes:
            self.too_large, self.pieces = True, []  # never stored: keep no more of it

    async def finish(self, model: str, prompt_tokens: int, completion_tokens: int, finish_reason: str) -> None:
        """Store the complete answer (a failure to store is only counted), then wake the waiters."""
        try:
            if self.too_large:
                self.cache.metrics.cache_evictions.labels("too_large").inc()
                return
            data = Entry(model, prompt_tokens, completion_tokens, finish_reason, self.pieces).encode()
            if len(data) > self.cache.cfg.max_entry_bytes:
                self.cache.metrics.cache_evictions.labels("too_large").inc()
                return
            try:
                await self.cache.store.set(self.key, data, self.cache.cfg.ttl_s)
                self.cache.metrics.cache_bytes.labels("stored").inc(len(data))
            except StateUnavailable as err:
                self.cache.failed(err)
        finally:
            self.release()

    def release(self) -> None:
        """Done or given up: waiters look again (and one of them generates if nothing was stored)."""
        if self.done:
            return
        self.done = True
        self.cache.release(self.key, self._future, self._token)


class ResponseCache:
    def __init__(self, cfg: CacheConfig, redis_url: str, metrics):
        self.cfg = cfg
        self.metrics = metrics
        self.prefix = cfg.redis_key_prefix
        if cfg.store == "redis":
            self.store = RedisStore(redis_url, cfg.redis_timeout_ms / 1000)
        else:
            self.store = MemoryStore(
                cfg.memory_max_bytes, lambda reason, n: metrics.cache_evictions.labels(reason).inc(n)
            )
            metrics.cache_memory_bytes.set_function(lambda: self.store.bytes)
        self._flights: dict[str, asyncio.Future] = {}  # key -> resolved when its leader is done
        self._tasks: set[asyncio.Task] = set()

    def key(self, tenant: str, model: str, valid: ValidRequest, messages) -> str | None:
        """The cache key of a request, or None if it may not be cached (not deterministic, or bypassed)."""
        if valid.cache_bypass or not deterministic(valid):
            return None
        return f"{self.prefix}{{t:{esc(tenant)}}}:{digest(model, valid, messages)}"

    def failed(self, err: Exception) -> None:
        self.metrics.state_store_failures.labels("cache").inc()
        log.warning("response cache unavailable (requests are generated): %s", err)

    async def _get(self, key: str) -> Entry | None:
        try:
            data = await self.store.get(key)
        except StateUnavailable as err:
            self.failed(err)
            return None
        if data is None:
            return None
        entry = Entry.decode(data)
        if entry is not None:
            self.metrics.cache_bytes.labels("served").inc(len(data))
        return entry

    async def lookup(self, key: str, model: str, deadline: float | None) -> tuple[Entry | None, Flight | None]:
        """The cached answer (a hit), or a Flight for the caller to generate and record (a miss).
        Identical misses in flight elsewhere are waited for first (single flight)."""
        loop = asyncio.get_running_loop()
        wait_until = loop.time() + self.cfg.single_flight_wait_ms / 1000
        if deadline is not None:
            wait_until = min(wait_until, deadline)
        while True:
            entry = await self._get(key)
            if entry is not None:
                self.metrics.cache_hits.labels(model).inc()
                return entry, None
            if not self.cfg.single_flight:
                break
            leader = self._flights.get(key)
            if leader is None:
                try:
                    token = await self.store.lock(key, self.cfg.single_flight_wait_ms / 1000)
                except StateUnavailable as err:
                    self.failed(err)
                    break
                if key in self._flights:  # another request here took it while we asked Redis
                    if token is not None:
                        self._background(self._unlock(key, token))
                    continue
                if token is not None:
                    future = loop.create_future()
                    self._flights[key] = future
                    self.metrics.cache_misses.labels(model).inc()
                    return None, Flight(self, key, future, token)
                # Another replica is generating it: look for its answer until it has one or gives up.
                if loop.time() >= wait_until:
                    break
                await asyncio.sleep(POLL_S)
                continue
            left = wait_until - loop.time()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(asyncio.shield(leader), left)
            except TimeoutError:
                pass
        # Not waiting (any more): generate; the answer is still stored for the next ones.
        self.metrics.cache_misses.labels(model).inc()
        return None, Flight(self, key, None, None)

    def release(self, key: str, future: asyncio.Future | None, token: str | None) -> None:
        if future is not None:
            if self._flights.get(key) is future:
                del self._flights[key]
            if not future.done():
                future.set_result(None)
        if token is not None and token != "local":
            self._background(self._unlock(key, token))

    async def _unlock(self, key: str, token: str) -> None:
        try:
            await self.store.unlock(key, token)
        except StateUnavailable:
            pass  # the lock expires after single_flight_wait_ms anyway

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.store.close()
