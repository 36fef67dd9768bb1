"""The worker's side of a session (``inference.session.Session``): frames, and what a slow reader gets."""

from __future__ import annotations

import asyncio

from igw_common.config import SyntheticConfig
from inference.session import Counters, Session
from inference.synthetic_engine import SyntheticEngine
from inference.v1 import worker_pb2 as pb

MODEL = "m"
TOKENS = 60


async def _collect(pause_s: float) -> tuple[dict[str, str], dict[str, int], dict[str, int], int]:
    """Three requests of TOKENS tokens at 1 ms steps; frames read with ``pause_s`` between them.
    Returns text, tokens and delta events per request, and the number of frames."""
    engine = SyntheticEngine(MODEL, SyntheticConfig(tokens_per_s=1000, text="a b c "))
    session = Session(1, engine, Counters())

    async def submits():
        yield pb.GatewayMessage(
            submits=[
                pb.Submit(
                    request_id=f"r{i}",
                    model=MODEL,
                    messages=[pb.ChatMessage(role="user", content="hi")],
                    sampling=pb.Sampling(max_tokens=TOKENS),
                )
                for i in range(3)
            ]
        )

    reader = asyncio.ensure_future(session.read(submits()))
    text: dict[str, str] = {}
    tokens: dict[str, int] = {}
    deltas: dict[str, int] = {}
    frames = finished = 0
    async for frame in session.frames():
        frames += 1
        for ev in frame.events:
            if ev.HasField("delta"):
                text[ev.request_id] = text.get(ev.request_id, "") + ev.delta.text
                tokens[ev.request_id] = tokens.get(ev.request_id, 0) + ev.delta.tokens
                deltas[ev.request_id] = deltas.get(ev.request_id, 0) + 1
            elif ev.HasField("finished"):
                assert ev.finished.completion_tokens == TOKENS
                finished += 1
        if finished == 3:
            break
        await asyncio.sleep(pause_s)
    await reader
    return text, tokens, deltas, frames


async def test_a_slow_reader_gets_each_requests_steps_merged_in_order():
    text, tokens, deltas, frames = await _collect(pause_s=0.02)
    expected = ("a b c " * TOKENS)[: len("a b c ") * TOKENS // 3]  # one word per token
    assert set(text) == {"r0", "r1", "r2"}
    for rid in text:
        assert tokens[rid] == TOKENS and text[rid] == expected  # nothing lost, nothing reordered
        assert deltas[rid] <= frames  # at most one delta per request per frame, not one per step
    assert frames < TOKENS // 2  # the 60 steps of each request travelled in far fewer frames


async def test_a_reader_that_keeps_up_gets_every_step():
    text, tokens, deltas, frames = await _collect(pause_s=0)
    for rid in text:
        assert tokens[rid] == TOKENS and deltas[rid] >= TOKENS // 2  # nothing was held back to merge
