"""Which worker gets a request.

Among the workers of the model that are ready, not draining and have room:
1. **Affinity**: the worker that last served the same session (``session_id``)
   or the same prompt prefix, so vLLM's prefix cache is reused.
2. Otherwise the **least loaded** by outstanding tokens (prompt + max_tokens
   of the requests in flight there), a proxy for queued decoding work.
The affinity map is an LRU of ``gateway.queue.affinity_entries`` entries.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Protocol, Sequence


class Candidate(Protocol):
    address: str
    outstanding_tokens: int


def affinity_key(session_id: str, messages) -> str:
    """The session id, or a hash of the prompt's prefix (all turns but the last, plus the
    start of the last), which is what vLLM's prefix cache can reuse."""
    if session_id:
        return "s:" + session_id
    if not messages:
        return ""
    head = [(m.role, m.content) for m in messages[:-1]] + [(messages[-1].role, messages[-1].content[:512])]
    return "p:" + hashlib.blake2b(json.dumps(head).encode(), digest_size=12).hexdigest()


class Router:
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
