"""Which worker gets a request.

1. **Pool** (with weighted pools, e.g. canary or blue-green): a stable hash
   of the tenant or session over the pools' weights, so one user stays on
   one pool until the weights change (``choose_pool``).
2. Among the workers of that pool serving the model, taking requests and
   with room for the request's tokens (``gateway.placement.strategy``):
   - **kv_cache** (the default), where every candidate reports its prefix
     cache (``gateway.workers.kv_cache``) and the gateway has the model's
     tokenizer: the least *cost*, ``kv_prefill_weight`` x the prompt tokens
     to compute there (this prompt's past the longest prefix the worker's
     engine holds, plus those of its requests still before their first
     token) + ``kv_load_weight`` x the tokens its running requests hold. It sees what the engines
     really hold: a shared system prompt or repository context cached on
     any worker, a restarted worker that holds nothing, an eviction.
     Otherwise, affinity:
   - **affinity**: the worker that last served the same session
     (``session_id``) or the same prompt prefix, so vLLM's prefix cache is
     likely reused (an LRU of ``gateway.queue.affinity_entries``);
     otherwise the least loaded;
   - **least_loaded**: by outstanding tokens alone.
3. **Overflow** (``gateway.pools[].overflow``, e.g. a cloud endpoint): its
   workers are candidates only for tenants and models that may burst
   (``gateway.overflow``), once the request has waited
   ``gateway.overflow.after_queue_ms`` or when no other pool's worker is up,
   and only when no other candidate has room.
Placing a request claims the room on the worker at once (``Connection.claim``),
so the next placement already sees it taken. Which workers are candidates
(health, drain, pools, priorities, fairness) is the scheduler's and the
worker set's business, the same for every strategy.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.core.scheduler import Ticket
from gateway.workers.membership import WorkerSet
from gateway.workers.tokenization import TOKENIZE_POOL, TemplateError, encode_job, tool_spec
from igw_common.config import PlacementConfig
from igw_common.kv_blocks import prompt_block_keys

log = logging.getLogger("gateway.core.placement")


class Candidate(Protocol):
    address: str
    outstanding_tokens: int


def affinity_key(tenant: str, session_id: str, messages) -> str:
    """The tenant's session, or a hash of the prompt's prefix (all turns but the last, plus the start
    of the last), which is what vLLM's prefix cache can reuse. Hashed with the tenant: a client's ids
    are never keys of shared state as sent."""
    if session_id:
        head = ["s", tenant, session_id]
    elif messages:
        head = (
            ["p", tenant]
            + [(m.role, m.content) for m in messages[:-1]]
            + [(messages[-1].role, messages[-1].content[:512])]
        )
    else:
        return ""
    return hashlib.blake2b(json.dumps(head).encode(), digest_size=12).hexdigest()


@dataclass(frozen=True, slots=True)
class PromptBlocks:
    """A prompt as the engines' prefix caches see it: its length and its full blocks' keys."""

    tokens: int
    block_size: int
    keys: tuple[bytes, ...]


class Router:
    """Affinity first, then least outstanding tokens."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._last: OrderedDict[str, str] = OrderedDict()  # affinity key -> worker address

    def choose(self, key: str, candidates: Sequence[Candidate]):
        """Pick a candidate (None if there is none) and remember it for ``key``."""
        if not candidates:
            return None
        chosen = None
        if key and (addr := self._last.get(key)) is not None:
            chosen = next((c for c in candidates if c.address == addr), None)
        if chosen is None:
            chosen = min(candidates, key=lambda c: c.outstanding_tokens)
        self.remember(key, chosen)
        return chosen

    def remember(self, key: str, chosen: Candidate) -> None:
        if key:
            self._last[key] = chosen.address
            self._last.move_to_end(key)
            if len(self._last) > self.max_entries:
                self._last.popitem(last=False)


def uncached_tokens(prompt: PromptBlocks, c) -> int:
    """The prompt's tokens past the longest prefix ``c``'s engine holds: what it would compute."""
    return prompt.tokens - min(prompt.tokens, c.kv.prefix_blocks(prompt.keys) * prompt.block_size)


def by_cached_prefix(prompt: PromptBlocks, candidates: Sequence, cfg: PlacementConfig):
    """The candidate with the least cost (module doc): the prefill it would do for this prompt plus the
    prefill already waiting there, against the tokens its running requests hold. Ties: least loaded."""

    def cost(c) -> tuple[float, int]:
        prefill = uncached_tokens(prompt, c) + c.prefill_tokens
        return cfg.kv_prefill_weight * prefill + cfg.kv_load_weight * c.active_tokens, c.active_tokens

    return min(candidates, key=cost)


class Placement:
    """The scheduler's placer over a worker set."""

    def __init__(self, workers: WorkerSet, affinity_entries: int, cfg: PlacementConfig | None = None):
        self.workers = workers
        self.router = Router(affinity_entries)
        self.cfg = cfg or PlacementConfig()
        self.weights = {spec.name: spec.weight for spec in workers.specs}
        self.metrics = workers.metrics

    def set_weights(self, weights: dict[str, int]) -> None:
        """New traffic weights (config reload). Streams in flight are untouched; new requests follow."""
        unknown = set(weights) - set(self.weights)
        if unknown:
            raise ValueError(f"unknown pools {sorted(unknown)}; pools themselves change only on restart")
        self.weights.update(weights)
        log.info("pool weights now %s", self.weights)

    def choose_pool(self, model: str, key: str) -> str:
        """The pool for a request: a stable hash of ``key`` (tenant or session) over the weights, so one
        user stays on one pool until the weights change, and a change moves only the users in the
        shifted range. "" (any pool) when the chosen pool cannot serve the model right now. Overflow pools
        are not chosen here (``overflow_reason``)."""
        specs = [spec for spec in self.workers.specs if not spec.overflow]
        pools = [spec.name for spec in specs if self.weights.get(spec.name, 0) > 0]
        total = sum(self.weights[p] for p in pools)
        if len(specs) <= 1 or not total:
            return ""
        serving = {w.pool for w in self.workers.models().get(model, [])}
        point = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 1_000_000
        point = point * total / 1_000_000
        for p in pools:
            point -= self.weights[p]
            if point < 0:
                return p if p in serving else ""
        return ""

    def wanted(self, ticket: Ticket) -> list:
        """Workers that could take the ticket once they have room: its pool's (any pool's when it has
        none), and an overflow pool's once ``overflow_reason`` says so."""
        serving = [w for w in self.workers.models().get(ticket.model, []) if w not in ticket.exclude]
        out = [w for w in serving if not w.overflow and (not ticket.pool or w.pool == ticket.pool)]
        if ticket.overflow_after_s is not None and len(out) < len(serving):
            if self.overflow_reason(ticket, bool(out)) is not None:
                out += [w for w in serving if w.overflow]
        return out

    @staticmethod
    def overflow_reason(ticket: Ticket, primary_up: bool) -> str | None:
        """Why a ticket that may burst may now go to an overflow pool (the ``igw_overflow_total`` reason):
        none of the other pools' workers is up, or it waited ``gateway.overflow.after_queue_ms``."""
        if ticket.overflow_after_s is None:
            return None
        if not primary_up:
            return "no_primary"
        if time.monotonic() - ticket.enqueued_at >= ticket.overflow_after_s:
            return "queue_time"
        return None

    def place(self, ticket: Ticket, held: set):
        """Claim room for the ticket on a worker (by the configured strategy, module doc), or None."""
        wanted = self.wanted(ticket)
        candidates = [w for w in wanted if w not in held and w.has_room(ticket.cost_tokens)]
        if not candidates:
            return None
        # An overflow pool costs more and leaves the premises: only when no other pool's worker has room.
        primaries = [c for c in candidates if not c.overflow]
        overflow = None
        if primaries:
            candidates = primaries
        else:
            overflow = self.overflow_reason(ticket, any(not w.overflow for w in wanted)) or "queue_time"
        strategy, prompt = self.cfg.strategy, ticket.prompt
        if strategy == "least_loaded":
            chosen = min(candidates, key=lambda c: c.outstanding_tokens)
        elif (
            strategy == "kv_cache"
            and prompt is not None
            and all(c.kv.block_size == prompt.block_size for c in candidates)
            # Nothing of it cached anywhere (a short prompt, a new conversation): history is all there is.
            and any(c.kv.prefix_blocks(prompt.keys[:1]) for c in candidates)
        ):
            chosen = by_cached_prefix(prompt, candidates, self.cfg)
            self.router.remember(ticket.affinity, chosen)  # so a fallback later keeps the same worker
        else:
            strategy = "affinity"
            chosen = self.router.choose(ticket.affinity, candidates)
        if self.metrics is not None:
            self.metrics.placements.labels(strategy).inc()
            if overflow is not None:
                self.metrics.overflows.labels(chosen.pool, overflow).inc()
        if prompt is not None:
            return chosen.claim(ticket.cost_tokens, prompt.tokens, uncached_tokens(prompt, chosen))
        return chosen.claim(ticket.cost_tokens, ticket.prompt_tokens)

    async def prompt_blocks(self, model: str, job) -> tuple[PromptBlocks | None, list[int]]:
        """The prompt's blocks (and its token ids), for placement by cached prefix: with the tokenizer of a
        worker of ``model`` that reports its cache, rendered as the worker renders it, off the event loop.
        None when no such worker exists or the template refuses the prompt (the worker will say why)."""
        if self.cfg.strategy != "kv_cache":
            return None, []
        reporting = [w for w in self.workers.workers if w.model == model and w.kv.reporting]
        source = next((w for w in reporting if w.tokenizer is not None), None)
        if source is None or len(reporting) < 2:  # nothing to choose between
            return None, []
        tok, block_size = source.tokenizer, source.kv.block_size
        try:
            ids = await asyncio.get_running_loop().run_in_executor(
                TOKENIZE_POOL, encode_job, tok, job, tool_spec(job.tools)
            )
        except TemplateError:
            return None, []  # the worker's own rendering will refuse it, with the reason
        except Exception as err:  # a prompt the gateway cannot render costs it its placement, nothing more
            log.warning("placement by cached prefix skipped a prompt it could not render: %s", type(err).__name__)
            return None, []
        return PromptBlocks(len(ids), block_size, tuple(prompt_block_keys(ids, block_size))), ids
