"""Prefix blocks named alike on worker and gateway: vLLM's own KV events (encoded by vLLM's classes) read
into block keys, the gateway's per-worker index, and placement by cached prefix against load."""

from __future__ import annotations

import msgspec
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

from gateway.core.placement import PromptBlocks, by_cached_prefix
from gateway.workers.kv_cache import CachedBlocks
from igw_common.config import PlacementConfig
from igw_common.kv_blocks import EngineBlocks, EventFeed, decode_batch, prompt_block_keys

BS = 4


def stored(hashes, parent, tokens, **kw):
    fields = {"lora_id": None, "medium": "GPU", "lora_name": None, **kw}
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=BS, **fields)


def publish(*events) -> bytes:
    return msgspec.msgpack.encode(KVEventBatch(ts=1.0, events=list(events)))


def test_vllms_own_events_become_the_keys_the_gateway_computes_for_a_prompt():
    prompt = list(range(100, 114))  # 3 full blocks of 4 and 2 tokens more
    engine = EngineBlocks()
    # vLLM's hashes are its own (random seed, any algorithm): only their chain matters.
    changes = engine.apply(decode_batch(publish(stored([b"h1", b"h2"], None, prompt[:8]))))
    changes2 = engine.apply(decode_batch(publish(stored([b"h3"], b"h2", prompt[8:12]))))
    keys = prompt_block_keys(prompt, BS)
    assert len(keys) == 3
    assert list(changes.stored) == keys[:2] and list(changes2.stored) == keys[2:]
    assert engine.block_size == BS and len(engine) == 3
    # Another prompt sharing the first block only: same first key, different second.
    other = prompt_block_keys(prompt[:4] + [1, 2, 3, 4], BS)
    assert other[0] == keys[0] and other[1] != keys[1]

    removed = engine.apply(decode_batch(publish(BlockRemoved(block_hashes=[b"h3"], medium="GPU"))))
    assert list(removed.removed) == [keys[2]] and len(engine) == 2
    cleared = engine.apply(decode_batch(publish(AllBlocksCleared())))
    assert cleared.cleared and len(engine) == 0


def test_blocks_that_cannot_be_chained_or_matched_are_not_tracked():
    engine = EngineBlocks()
    engine.apply(decode_batch(publish(stored([b"x"], b"unknown-parent", [1, 2, 3, 4]))))
    assert len(engine) == 0 and engine.unchained == 1
    engine.apply(decode_batch(publish(stored([b"y"], None, [1, 2, 3, 4], lora_name="adapter"))))
    engine.apply(decode_batch(publish(stored([b"z"], None, [1, 2, 3]))))  # not a full block
    assert len(engine) == 0


def test_changes_merge_so_a_key_is_never_both_stored_and_removed():
    engine = EngineBlocks()
    a = engine.apply(decode_batch(publish(stored([b"h1"], None, [1, 2, 3, 4]))))
    b = engine.apply(decode_batch(publish(BlockRemoved(block_hashes=[b"h1"], medium="GPU"))))
    a.merge(b)
    assert not a.stored and list(a.removed) == prompt_block_keys([1, 2, 3, 4], BS)
    c = engine.apply(decode_batch(publish(stored([b"h1"], None, [1, 2, 3, 4]))))
    a.merge(c)
    assert list(a.stored) == prompt_block_keys([1, 2, 3, 4], BS) and not a.removed


def test_a_gap_in_the_publishers_sequence_forgets_what_was_known():
    seen = []
    feed = EventFeed("ipc://none", "kv", seen.append)
    feed.take([b"kv", (1).to_bytes(8, "big"), publish(stored([b"h1"], None, [1, 2, 3, 4]))])
    feed.take([b"kv", (3).to_bytes(8, "big"), publish(stored([b"h9"], None, [5, 6, 7, 8]))])
    assert seen[1].cleared and len(feed.blocks) == 1
    feed.take([b"kv", (4).to_bytes(8, "big"), b"\xc1not msgpack"])  # logged and ignored
    feed.take([b"kv", b"short", b""])
    assert len(seen) == 2


def test_the_index_counts_a_cached_prefix_only_and_is_bounded():
    keys = prompt_block_keys(list(range(40)), BS)
    idx = CachedBlocks(max_blocks=5)
    idx.apply(False, keys[:3] + keys[5:7], [])
    assert idx.prefix_blocks(keys) == 3  # blocks after a missing one do not count
    idx.apply(False, [b"bad size"], [keys[0]])
    assert idx.prefix_blocks(keys) == 0
    idx.apply(False, keys[:8], [])
    assert len(idx) == 5 and idx.prefix_blocks(keys) == 0  # the oldest-stored went first
    assert idx.prefix_blocks(keys[3:]) == 5
    idx.apply(True, keys[:2], [])
    assert len(idx) == 2 and idx.prefix_blocks(keys) == 2


class W:
    def __init__(self, address, active, cached_keys=(), prefill=0):
        self.address, self.active_tokens, self.prefill_tokens = address, active, prefill
        self.kv = CachedBlocks(100)
        self.kv.block_size = BS
        self.kv.apply(True, cached_keys, [])


def test_placement_weighs_the_uncached_prefill_against_load():
    ids = list(range(400))
    prompt = PromptBlocks(len(ids), BS, tuple(prompt_block_keys(ids, BS)))
    cold, warm = W("cold", 0), W("warm", 1000, prompt.keys[:90])  # 360 of 400 tokens cached
    cfg = PlacementConfig()  # a prefill token weighs 1, a running token 0.1
    assert by_cached_prefix(prompt, [cold, warm], cfg) is warm  # 40 + 100 < 400 + 0
    warm.prefill_tokens = 300  # a prompt waiting there for its prefill
    assert by_cached_prefix(prompt, [cold, warm], cfg) is cold  # 40 + 300 + 100 > 400
    warm.prefill_tokens = 0
    warm.active_tokens = 4000
    assert by_cached_prefix(prompt, [cold, warm], cfg) is cold  # 40 + 400 > 400: too busy for its cache
    assert by_cached_prefix(prompt, [cold, warm], PlacementConfig(kv_load_weight=0.05)) is warm
    assert by_cached_prefix(prompt, [W("a", 7), W("b", 3)], cfg).address == "b"  # nothing cached: least load


class Conn(W):
    """A worker connection as placement sees it."""

    def __init__(self, address, active, cached_keys=(), block_size=BS):
        super().__init__(address, active, cached_keys)
        self.kv.block_size = block_size
        self.outstanding_tokens, self.claimed = active, []
        self.overflow, self.pool = False, "default"

    def has_room(self, cost):
        return True

    def claim(self, cost, prompt_tokens, prefill_tokens=None):
        self.claimed.append((prompt_tokens, prefill_tokens))
        return self


class Pool:
    def __init__(self, conns):
        self.workers, self.metrics = conns, None
        self.specs = [type("Spec", (), {"name": "default", "weight": 100})()]

    def models(self):
        return {"m": self.workers}


def _ticket(prompt, affinity="s1"):
    from gateway.core.scheduler import Ticket

    class T(Ticket):  # no event loop needed for a placement decision
        def __init__(self, **kw):
            self.__dict__.update(kw)

    return T(
        model="m",
        tenant="t",
        priority="interactive",
        cost_tokens=500,
        prompt_tokens=0,
        affinity=affinity,
        exclude=frozenset(),
        pool="",
        prompt=prompt,
    )


def test_placement_falls_back_to_affinity_unless_the_cache_can_decide():
    from gateway.core.placement import Placement

    ids = list(range(400))
    prompt = PromptBlocks(len(ids), BS, tuple(prompt_block_keys(ids, BS)))
    a, b = Conn("a", 0), Conn("b", 50, prompt.keys[:50])
    placement = Placement(Pool([a, b]), 100, PlacementConfig())
    assert placement.place(_ticket(prompt), set()) is b  # b holds 200 of 400 tokens
    assert b.claimed == [(400, 200)]  # its claim: the real prompt, and the half b must compute
    # Nothing of the prompt cached anywhere: affinity (which remembered b for s1), not least load.
    other = PromptBlocks(400, BS, tuple(prompt_block_keys(list(range(1000, 1400)), BS)))
    assert placement.place(_ticket(other), set()) is b
    # One candidate reports no cache (or another block size): affinity again.
    c = Conn("c", 0, block_size=0)
    placement = Placement(Pool([a, b, c]), 100, PlacementConfig())
    assert placement.place(_ticket(prompt, affinity=""), set()) is a  # least loaded, cache ignored
    least = Placement(Pool([a, b]), 100, PlacementConfig(strategy="least_loaded"))
    assert least.place(_ticket(prompt), set()) is a
