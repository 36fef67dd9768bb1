"""What each worker's engine holds in its prefix cache, as the gateway knows it.

A worker that reports its cache (our worker: ``WorkerFrame.kv_cache``, from vLLM's KV-cache events; a
stock vLLM gRPC server: its own ZMQ publisher, ``gateway.workers[].kv_events_endpoint``) keeps a
``CachedBlocks`` here: the block keys (``igw_common.kv_blocks``) it holds. Placement asks how many of a
prompt's leading blocks a worker holds (``prefix_blocks``).

Bounded: at most ``gateway.placement.kv_max_blocks_per_worker`` keys per worker; beyond that the
oldest-stored are forgotten first (the engine evicts least-recently-used blocks, so those are the
likeliest to be gone). Emptied when the worker's connection is lost or re-established: a restarted
engine holds nothing, and the first frame of a new session lists what it does hold.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from igw_common.kv_blocks import KEY_BYTES


class CachedBlocks:
    """One worker's cached prefix blocks."""

    def __init__(self, max_blocks: int):
        self.max_blocks = max_blocks
        self.block_size = 0  # tokens per block; 0 = the worker reports no cache
        self._keys: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def reporting(self) -> bool:
        return self.block_size > 0

    def clear(self) -> None:
        self._keys.clear()

    def apply(self, reset: bool, stored: Iterable[bytes], removed: Iterable[bytes]) -> None:
        """One change report (the worker's word, so each key's size is checked)."""
        if reset:
            self._keys.clear()
        for key in removed:
            self._keys.pop(key, None)
        for key in stored:
            if len(key) != KEY_BYTES:
                continue
            self._keys[key] = None
            self._keys.move_to_end(key)
        while len(self._keys) > self.max_blocks:
            self._keys.popitem(last=False)

    def prefix_blocks(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys`` (a prompt's blocks, in order) are cached, counting from the first: a block
        after a missing one is of no use, the engine reuses a cached prefix only."""
        n = 0
        for key in keys:
            if key not in self._keys:
                break
            n += 1
        return n
