"""Which worker gets a request.

Least outstanding tokens (sum of ``max_tokens`` of the requests in flight on
each worker): a proxy for how much decoding work each worker has queued.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class Candidate(Protocol):
    outstanding_tokens: int


def choose(candidates: Sequence[Candidate]):
    """The least-loaded candidate, or None when there is none."""
    return min(candidates, key=lambda w: w.outstanding_tokens, default=None)
