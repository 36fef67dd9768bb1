"""Which prefix blocks an engine holds, named the same way on the worker and in the gateway.

vLLM's prefix cache is a set of full blocks (``block_size`` tokens each); a block's hash chains
its parent's hash with its own tokens, so a block stands for the whole prefix up to its end.
vLLM publishes what it stores and evicts as KV-cache events (``BlockStored``, ``BlockRemoved``,
``AllBlocksCleared``; msgpack on a ZMQ PUB socket, ``vllm.distributed.kv_events``).

The gateway cannot recompute vLLM's own hashes for a prompt: they depend on the engine's hash
algorithm and seed (random per process for the non-cryptographic ones, or set by PYTHONHASHSEED),
and computing them would mean importing vLLM (and torch) into the gateway. So each engine hash is
translated, as it is reported, into a **block key** that needs neither: the same chaining over the
tokens the event itself reports, with a fixed hash (BLAKE2b, 16 bytes). The keys follow the engine's
own blocks (its block size, its chain), so a prompt's keys (``prompt_block_keys``) name exactly the
blocks the engine would find cached for it, on any worker, whatever its hash settings.

``EngineBlocks`` keeps the engine-hash -> key map, bounded by what the engine itself holds (an
evicted block leaves the map). Used by our worker (events read from its in-process engine) and by
the gateway (events read from a stock vLLM server's ZMQ endpoint).
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgspec

log = logging.getLogger(__name__)

KEY_BYTES = 16
_ROOT = b"\0" * KEY_BYTES
# An engine's blocks beyond this many are not tracked (a bound on a peer's word, far above any real
# KV cache: 1M blocks of 16 tokens is 16M tokens).
MAX_TRACKED_BLOCKS = 1_000_000


def block_key(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """The key of a full block after ``parent`` (None: the first block of a prompt)."""
    h = hashlib.blake2b(parent or _ROOT, digest_size=KEY_BYTES)
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return h.digest()


def prompt_block_keys(token_ids: Sequence[int], block_size: int, limit: int = 0) -> list[bytes]:
    """The keys of a prompt's full blocks, in order (at most ``limit`` of them; 0 = all)."""
    keys: list[bytes] = []
    if block_size <= 0:
        return keys
    n = len(token_ids) // block_size
    if limit:
        n = min(n, limit)
    parent = None
    for i in range(n):
        parent = block_key(parent, token_ids[i * block_size : (i + 1) * block_size])
        keys.append(parent)
    return keys


@dataclass
class Changes:
    """What a run of engine events did, in block keys: ``cleared`` first, then the rest. A key is never
    both stored and removed (the later event wins), so the two lists may be applied in any order."""

    stored: dict[bytes, None] = field(default_factory=dict)  # ordered sets
    removed: dict[bytes, None] = field(default_factory=dict)
    cleared: bool = False

    def __bool__(self) -> bool:
        return bool(self.stored or self.removed or self.cleared)

    def store(self, key: bytes) -> None:
        self.removed.pop(key, None)
        self.stored[key] = None

    def remove(self, key: bytes) -> None:
        # Sent even for a key stored earlier in this run: the receiver may have known it from before.
        self.stored.pop(key, None)
        self.removed[key] = None

    def merge(self, later: "Changes") -> None:
        """Fold ``later``'s changes into these (both unsent)."""
        if later.cleared:
            self.stored.clear()
            self.removed.clear()
            self.cleared = True
        for key in later.removed:
            self.remove(key)
        for key in later.stored:
            self.store(key)


class EngineBlocks:
    """One engine's cached blocks: engine hash -> block key, from its events."""

    def __init__(self, max_blocks: int = MAX_TRACKED_BLOCKS):
        self.max_blocks = max_blocks
        self.block_size = 0  # learned from the first BlockStored
        self._keys: dict[object, bytes] = {}
        self.unchained = 0  # blocks whose parent was unknown (an event missed): not tracked

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[bytes]:
        return list(self._keys.values())

    def apply(self, events: Iterable[dict]) -> Changes:
        """Apply decoded events (``decode_batch``) and say what changed, in block keys."""
        out = Changes()
        for ev in events:
            kind = ev.get("type")
            if kind == "BlockStored":
                self._stored(ev, out)
            elif kind == "BlockRemoved":
                for h in ev.get("block_hashes") or ():
                    key = self._keys.pop(_hashable(h), None)
                    if key is not None:
                        out.remove(key)
            elif kind == "AllBlocksCleared":
                self._keys.clear()
                out.stored.clear()
                out.removed.clear()
                out.cleared = True
        return out

    def _stored(self, ev: dict, out: Changes) -> None:
        if ev.get("lora_name") or ev.get("lora_id") or any(ev.get("extra_keys") or ()):
            return  # blocks of an adapter, an image or a cache salt: a plain text prompt never matches them
        size = int(ev.get("block_size") or 0)
        hashes = ev.get("block_hashes") or ()
        tokens = ev.get("token_ids") or ()
        if size <= 0 or len(tokens) != size * len(hashes):
            return  # a partial block (vLLM reports only full ones) or a malformed event
        self.block_size = self.block_size or size
        if size != self.block_size:
            return
        parent_hash = ev.get("parent_block_hash")
        parent = None
        if parent_hash is not None:
            parent = self._keys.get(_hashable(parent_hash))
            if parent is None:
                self.unchained += len(hashes)
                return
        for i, h in enumerate(hashes):
            parent = block_key(parent, tokens[i * size : (i + 1) * size])
            h = _hashable(h)
            if h not in self._keys and len(self._keys) >= self.max_blocks:
                return
            self._keys[h] = parent
            out.store(parent)


def _hashable(h) -> object:
    # vLLM's hashes are bytes, or 64-bit ints with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES; msgpack may hand
    # back other byte-like types.
    return bytes(h) if isinstance(h, (bytearray, memoryview)) else h


_decoder = msgspec.msgpack.Decoder()


def decode_batch(payload: bytes) -> list[dict]:
    """The events of one published batch (vLLM's ``KVEventBatch``: ``[ts, events, dp_rank]``, each
    event a map tagged by ``type``). Raises ValueError for a payload that is not one."""
    try:
        batch = _decoder.decode(payload)
    except msgspec.DecodeError as err:
        raise ValueError(f"not a KV event batch: {err}") from None
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise ValueError("not a KV event batch: expected [ts, events, ...]")
    return [ev for ev in batch[1] if isinstance(ev, dict)]


class EventFeed:
    """Follows an engine's KV-event publisher (vLLM's ZMQ PUB socket) and keeps ``blocks`` current.

    ``on_changes`` gets each batch's changes in block keys. A gap in the publisher's sequence numbers
    (events dropped at its high-water mark) clears what is known: a block believed cached that is not
    costs a placement its benefit, so forgetting is the safe side; blocks come back as they are used."""

    def __init__(self, endpoint: str, topic: str, on_changes, blocks: EngineBlocks | None = None):
        self.endpoint, self.topic = endpoint, topic
        self.on_changes = on_changes
        self.blocks = blocks if blocks is not None else EngineBlocks()
        self.batches = 0
        self._last_seq: int | None = None

    async def run(self) -> None:
        """Receive until cancelled (the socket is closed on the way out)."""
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
        sock.connect(self.endpoint)
        try:
            while True:
                parts = await sock.recv_multipart()
                self.take(parts)
        finally:
            sock.close()

    def take(self, parts: list[bytes]) -> None:
        """One published message: ``[topic, seq (8 bytes, big-endian), payload]``."""
        if len(parts) != 3 or len(parts[1]) != 8:
            log.warning("KV events from %s: a message of an unknown shape was ignored", self.endpoint)
            return
        seq = int.from_bytes(parts[1], "big", signed=True)
        try:
            events = decode_batch(parts[2])
        except ValueError as err:
            log.warning("KV events from %s: %s", self.endpoint, err)
            return
        if self._last_seq is not None and seq != self._last_seq + 1:
            log.warning(
                "KV events from %s: %d batches missed; forgetting its blocks", self.endpoint, seq - self._last_seq - 1
            )
            events = [{"type": "AllBlocksCleared"}, *events]
        self._last_seq = seq
        self.batches += 1
        changes = self.blocks.apply(events)
        if changes:
            self.on_changes(changes)
