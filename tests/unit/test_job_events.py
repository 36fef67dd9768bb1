"""What WatchJob's writer (``gateway.doors.job_runner._Events``) does when a run ends while it is writing: the text in
flight is written, then the rest, in order (cancelling the write lost a piece from the middle)."""

from __future__ import annotations

import asyncio

from gateway.doors.job_runner import _Events


class SlowQueue:
    """A job queue whose stream writes wait for ``gate``."""

    events_max = 100

    def __init__(self):
        self.redis = self
        self.gate = asyncio.Event()
        self.written: list[str] = []

    async def run(self, what, fn):
        return await fn()

    async def xadd(self, key, fields, maxlen):
        await self.gate.wait()
        self.written.append(fields["x"])


async def test_ending_a_run_during_a_write_keeps_its_text_and_order():
    q = SlowQueue()
    events = _Events(q, "job", 1, flush_ms=1)
    events.add("a ", 1)
    await asyncio.sleep(0.02)  # the write of "a " has begun and waits at the gate
    events.add("b ", 1)
    closing = asyncio.ensure_future(events.close())
    await asyncio.sleep(0.01)
    q.gate.set()
    await asyncio.wait_for(closing, 1)
    assert q.written == ["a ", "b "]


async def test_text_that_comes_during_a_write_is_written_without_waiting_for_more():
    q = SlowQueue()
    events = _Events(q, "job", 1, flush_ms=1)
    events.add("a ", 1)
    await asyncio.sleep(0.02)
    events.add("b ", 1)  # no delta comes after this one until the run ends
    q.gate.set()
    await asyncio.sleep(0.05)
    assert q.written == ["a ", "b "]
    await events.close()
