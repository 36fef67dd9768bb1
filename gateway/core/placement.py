"""Which worker gets a request.

1. **Pool** (with weighted pools, e.g. canary or blue-green): a stable hash
   of the tenant or session over the pools' weights, so one user stays on
   one pool until the weights change (``choose_pool``).
2. Among the workers of that pool serving the model, taking requests and
   with room for the request's tokens:
   - **affinity**: the worker that last served the same session
     (``session_id``) or the same prompt prefix, so vLLM's prefix cache is
     reused (an LRU of ``gateway.queue.affinity_entries``);
   - otherwise the **least loaded** by outstanding tokens (prompt +
     max_tokens of the requests in flight there).
Placing a request claims the room on the worker at once (``Connection.claim``),
so the next placement already sees it taken.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from gateway.core.scheduler import Ticket
from gateway.workers.membership import WorkerSet

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
        if key:
            self._last[key] = chosen.address
            self._last.move_to_end(key)
            if len(self._last) > self.max_entries:
                self._last.popitem(last=False)
        return chosen


class Placement:
    """The scheduler's placer over a worker set."""

    def __init__(self, workers: WorkerSet, affinity_entries: int):
        self.workers = workers
        self.router = Router(affinity_entries)
        self.weights = {spec.name: spec.weight for spec in workers.specs}

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
        shifted range. "" (any pool) when the chosen pool cannot serve the model right now."""
        specs = self.workers.specs
        pools = [spec.name for spec in specs if self.weights.get(spec.name, 0) > 0]
        total = sum(self.weights[p] for p in pools)
        if len(specs) == 1 or not total:
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
        """Workers that could take the ticket once they have room."""
        return [
            w
            for w in self.workers.models().get(ticket.model, [])
            if w not in ticket.exclude and (not ticket.pool or w.pool == ticket.pool)
        ]

    def place(self, ticket: Ticket, held: set):
        """Claim room for the ticket on a worker (affinity first, then least loaded), or None."""
        candidates = [w for w in self.wanted(ticket) if w not in held and w.has_room(ticket.cost_tokens)]
        chosen = self.router.choose(ticket.affinity, candidates)
        return chosen.claim(ticket.cost_tokens) if chosen is not None else None
