"""The stream interval's clock, shared by our workers (which pace their requests' deltas at the source) and
the gateway (which paces on the way out for workers that do not).

A delta that comes less than an interval after its stream's last message is held for a tick: ticks are the
multiples of a quarter interval on the event loop's clock, so the held deltas of every stream with that
interval share one timer and one frame per tick, and a stream's messages are 1 to 1.25 intervals apart.
One tick per interval merged more but spaced messages up to two intervals apart.
"""

from __future__ import annotations

import math

MAX_STREAM_INTERVAL_MS = 1000  # what a request may ask for (validated by the gateway, capped by workers)
TICKS_PER_INTERVAL = 4


def next_tick(last_sent: float, interval_s: float) -> tuple[tuple[float, int], float]:
    """The first tick an interval or more after ``last_sent`` (loop time): its key and its time."""
    n = math.ceil((last_sent + interval_s) * TICKS_PER_INTERVAL / interval_s)
    return (interval_s, n), n * interval_s / TICKS_PER_INTERVAL
