"""Where cached answers are kept: ``memory`` (this process, LRU within a byte budget) or ``redis``
(shared by all replicas, with a lock key per answer being generated for single flight)."""

from __future__ import annotations

import collections
import time
import uuid

from gateway.state.redis import call, client


class MemoryStore:
    """In-process: least recently used first out beyond ``max_bytes``; entries expire after their TTL."""

    def __init__(self, max_bytes: int, on_evict):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: collections.OrderedDict[str, tuple[float, bytes]] = collections.OrderedDict()
        self._on_evict = on_evict  # (reason, count)

    def __len__(self) -> int:
        return len(self._items)

    def _drop(self, key: str) -> None:
        _, value = self._items.pop(key)
        self.bytes -= len(value)

    async def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= time.monotonic():
            self._drop(key)
            self._on_evict("expired", 1)
            return None
        self._items.move_to_end(key)
        return item[1]

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if key in self._items:
            self._drop(key)
        self._items[key] = (time.monotonic() + ttl_s, value)
        self.bytes += len(value)
        evicted = 0
        while self.bytes > self.max_bytes and self._items:
            self._drop(next(iter(self._items)))
            evicted += 1
        if evicted:
            self._on_evict("capacity", evicted)

    async def lock(self, key: str, ttl_s: float) -> str | None:
        return "local"  # the in-process flights are the lock

    async def unlock(self, key: str, token: str) -> None:
        pass

    async def close(self) -> None:
        pass


_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class RedisStore:
    """Shared by all replicas. Entries expire after their TTL (Redis's own eviction policy may drop
    them earlier; the gateway cannot count those)."""

    def __init__(self, url: str, timeout_s: float):
        self._redis = client(url, timeout_s)
        self._timeout_s = timeout_s
        self._unlock = self._redis.register_script(_UNLOCK)

    async def get(self, key: str) -> bytes | None:
        return await call("cache get", self._timeout_s, lambda: self._redis.get(key))

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        await call("cache set", self._timeout_s, lambda: self._redis.set(key, value, px=int(ttl_s * 1000)))

    async def lock(self, key: str, ttl_s: float) -> str | None:
        token = uuid.uuid4().hex
        ok = await call(
            "cache lock", self._timeout_s, lambda: self._redis.set(key + ":lock", token, nx=True, px=int(ttl_s * 1000))
        )
        return token if ok else None

    async def unlock(self, key: str, token: str) -> None:
        await call("cache unlock", self._timeout_s, lambda: self._unlock(keys=[key + ":lock"], args=[token]))

    async def close(self) -> None:
        await self._redis.aclose()
