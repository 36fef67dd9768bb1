"""RequestStream: what the worker side pushes, the core pulls at the client's pace."""

from __future__ import annotations

import asyncio

import grpc

from gateway.workers.streaming import Pacer, RequestStream


class FakeClaim:
    def __init__(self):
        self.cost, self.released = None, 0

    def resize(self, cost, prompt_tokens=None):
        self.cost = cost

    def release(self):
        self.released += 1

    def prefilled(self):
        pass


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


class CountingPacer(Pacer):
    def __init__(self):
        super().__init__()
        self.waits = 0

    async def wait(self, interval_s, stream, sent_at):
        self.waits += 1
        await super().wait(interval_s, stream, sent_at)


async def _paced_reader(pacer: Pacer, s: RequestStream, interval_s: float) -> list[int]:
    """The core's loop in small: take an update, send it, let the pacer hold the next one back."""
    loop, sizes = asyncio.get_running_loop(), []
    while True:
        u = await s.next()
        if u.finish_reason:
            return sizes
        sizes.append(u.tokens)
        await pacer.after_send(interval_s, s, loop.time())


async def test_pacer_merges_steps_faster_than_the_interval():
    pacer, s = CountingPacer(), RequestStream(max_tokens=200, cost_tokens=300)
    reader = asyncio.ensure_future(_paced_reader(pacer, s, 0.025))
    for _ in range(120):  # 1 ms engine steps for about 120 ms (more on a loaded machine)
        s.on_delta("t", 1)
        await asyncio.sleep(0.001)
    s.on_finished("length", 1)
    sizes = await reader
    assert sum(sizes) == 120 and sizes[0] == 1  # every token, and the first one at once, alone
    assert len(sizes) < 30 and max(sizes) > 1  # merged: far fewer messages than steps
    assert pacer.waits >= len(sizes) - 1  # each later message waited for a tick


async def test_pacer_costs_no_tick_when_steps_are_slower_than_the_interval():
    pacer, s = CountingPacer(), RequestStream(max_tokens=20, cost_tokens=30)
    reader = asyncio.ensure_future(_paced_reader(pacer, s, 0.005))
    for _ in range(8):
        s.on_delta("t", 1)
        await asyncio.sleep(0.03)  # six intervals between steps
    s.on_finished("length", 1)
    assert await reader == [1] * 8 and pacer.waits == 0


async def test_pacer_lets_the_end_out_without_waiting_for_a_tick():
    pacer, s = Pacer(), RequestStream(max_tokens=20, cost_tokens=30)
    loop = asyncio.get_running_loop()
    s.on_delta("a", 1)
    await s.next()
    sent = loop.time()
    held = asyncio.ensure_future(pacer.after_send(1.0, s, sent))  # a 1 s interval
    await asyncio.sleep(0.01)
    s.on_delta("b", 1)  # within the interval: held for the tick
    await asyncio.sleep(0.01)
    assert not held.done()
    s.on_finished("stop", 1)
    await asyncio.wait_for(held, 0.5)  # released by the end, long before the tick


async def test_pacer_never_sends_two_messages_of_a_stream_closer_than_its_interval():
    """Two streams that sent at different moments share the ticks, yet neither gets a tick that comes less
    than an interval after its own last message."""
    pacer, loop = Pacer(), asyncio.get_running_loop()
    a, b = RequestStream(max_tokens=5, cost_tokens=9), RequestStream(max_tokens=5, cost_tokens=9)
    a_sent = loop.time()
    a_wait = asyncio.ensure_future(pacer.after_send(0.05, a, a_sent))
    await asyncio.sleep(0.01)
    a.on_delta("x", 1)  # a waits for a tick from here
    await asyncio.sleep(0.03)
    b_sent = loop.time()  # b sent later than a: a's tick comes too early for b
    b_wait = asyncio.ensure_future(pacer.after_send(0.05, b, b_sent))
    b.on_delta("y", 1)
    await a_wait
    a_at = loop.time()
    await b_wait
    b_at = loop.time()
    assert a_at - a_sent >= 0.049 and b_at - b_sent >= 0.049


async def test_a_stream_resumes_only_with_every_tokens_id_and_tokens_left():
    s = RequestStream(max_tokens=5, cost_tokens=10, resumes=1)
    s.on_delta("a ", 1, token_ids=(7,))
    s.on_delta("b c ", 2, token_ids=(8, 9))
    assert s.can_resume and s.token_ids == [7, 8, 9]
    s.on_resume("worker-a")
    assert (await s.next()).text == "a b c "  # what arrived before the loss goes out first
    assert (await s.next()).resume_from == "worker-a"
    s.resume()
    s.on_delta("d ", 1, token_ids=(10,))
    assert not s.can_resume  # one resume per request here, used
    unreported = RequestStream(max_tokens=5, cost_tokens=10, resumes=2)
    unreported.on_delta("a ", 1)  # a worker that sends no ids
    assert not unreported.can_resume and unreported.token_ids is None
    done = RequestStream(max_tokens=1, cost_tokens=10, resumes=2)
    done.on_delta("a ", 1, token_ids=(7,))
    assert not done.can_resume  # nothing left to make
    off = RequestStream(max_tokens=5, cost_tokens=10)
    off.on_delta("a ", 1, token_ids=(7,))
    assert not off.can_resume and off.token_ids is None
