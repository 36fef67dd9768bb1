"""The response cache: exact-match answers of deterministic requests.

A request is deterministic, so cacheable, when it asks for temperature 0 or a fixed ``seed``, and
did not ask to bypass the cache (``ExecuteRequest.cache_bypass``, HTTP ``x-igw-cache: bypass``).
Its key is the tenant (in clear, so a hit can never cross tenants, even on a hash collision) and a
SHA-256 of what the worker would see: model, the rendered conversation (session history and
``context`` included), raw prompt and suffix, and every sampling parameter.

The value is the whole answer as it was streamed: each delta's text and token count, the finish
reason and the usage. A hit replays those deltas in order (``started``, the deltas, ``done`` marked
``cache_hit``), so a client cannot tell a hit from a miss but by that mark and its speed, and
``sum(delta.tokens) == usage.completion_tokens`` holds as for a miss.

Single flight: identical misses that arrive while one of them is generating wait for its answer (at
most ``single_flight_wait_ms``, never past their deadline) and are then served as hits; if the
generating one fails, one of the waiters generates. Within a gateway the waiters wait on a future;
across replicas (store redis) the first takes a lock key (``SET NX PX``) and the others poll for the
answer, every ``POLL_S``.

Stores: ``memory`` (this process; LRU within ``memory_max_bytes``, the embedded default) and
``redis`` (shared by all replicas; entries expire after ``ttl_s``). A Redis failure is a miss: the
request is generated, never refused, and the failure is counted.
"""

from gateway.state.cache.responses import Entry, Flight, ResponseCache, deterministic, digest
from gateway.state.cache.store import MemoryStore, RedisStore

__all__ = ["Entry", "Flight", "MemoryStore", "RedisStore", "ResponseCache", "deterministic", "digest"]
