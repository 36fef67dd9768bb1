"""RequestStream: what the worker side pushes, the core pulls at the client's pace."""

from __future__ import annotations

import asyncio

import grpc

from gateway.streaming import RequestStream


class FakeClaim:
    def __init__(self):
        self.cost, self.released = None, 0

    def resize(self, cost):
        self.cost = cost

    def release(self):
        self.released += 1


async def test_acceptance_then_merged_text_then_the_end():
    s = RequestStream(max_tokens=50, cost_tokens=500)
    s.claim = FakeClaim()
    s.on_accepted(7)
    assert s.claim.cost == 57 and s.cost_tokens == 57  # the claim shrinks to the real prompt + max_tokens
    for i in range(100):  # a slow reader: 100 steps arrive before it takes anything
        s.on_delta(f"{i},", 1)
    assert len(s._text) < 32  # compacted, not one object per step
    s.on_finished("length", 7)
    first = await s.next()
    assert first.accepted_prompt_tokens == 7
    merged = await s.next()
    assert merged.text == "".join(f"{i}," for i in range(100)) and merged.tokens == 100
    end = await s.next()
    assert end.finish_reason == "length" and s.claim is None  # the room is given back at the end


async def test_next_waits_for_the_worker():
    s = RequestStream(max_tokens=5, cost_tokens=10)
    waiter = asyncio.ensure_future(s.next())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    s.on_delta("a", 1)
    assert (await waiter).text == "a"


async def test_first_final_event_wins_and_releases_once():
    s = RequestStream(max_tokens=5, cost_tokens=10)
    s.claim = claim = FakeClaim()
    s.on_error(grpc.StatusCode.UNAVAILABLE, "cut")
    s.on_finished("stop", 3)
    assert (await s.next()).error[0] == grpc.StatusCode.UNAVAILABLE
    assert claim.released == 1


async def test_retry_before_first_token_then_resume():
    s = RequestStream(max_tokens=5, cost_tokens=10, retries=1)
    s.claim = claim = FakeClaim()
    s.on_retry("worker-a")
    assert s.retries_left == 0 and claim.released == 1 and s.worker is None
    assert (await s.next()).retry_from == "worker-a"
    s.resume()
    assert not s.finished
    s.on_delta("x", 1)
    assert (await s.next()).text == "x"


async def test_inter_token_latency_is_observed_per_token_as_it_arrives():
    seen = []

    class Hist:
        def observe(self, v):
            seen.append(v)

    s = RequestStream(max_tokens=10, cost_tokens=10, itl_observer=Hist())
    s.on_delta("a", 1)  # the first token: TTFT, not ITL
    await asyncio.sleep(0.02)
    s.on_delta("bc", 2)
    assert len(seen) == 2 and all(0.005 < v < 0.5 for v in seen)
