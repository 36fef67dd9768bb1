"""The worker's side of a session (``inference.session.Session``): frames, and what a slow reader gets."""

from __future__ import annotations

import asyncio
import time

from igw_common.config import SyntheticConfig
from igw_worker_api.v1 import worker_pb2 as pb
from inference.session import Counters, Session
from inference.synthetic_engine import SyntheticEngine

MODEL = "m"
TOKENS = 60


async def _collect(
    pause_s: float, intervals_ms: tuple[int, int, int] = (0, 0, 0), arrivals: dict | None = None
) -> tuple[dict[str, str], dict[str, int], dict[str, int], int]:
    """Three requests of TOKENS tokens at 1 ms steps, asking for ``intervals_ms`` between deltas; frames read
    with ``pause_s`` between them. Returns text, tokens and delta events per request, and the number of
    frames; ``arrivals`` gets each request's delta (time, tokens) and its end time."""
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
                    stream_interval_ms=intervals_ms[i],
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
            if arrivals is not None and not ev.HasField("accepted"):
                arrivals.setdefault(ev.request_id, []).append(
                    (time.monotonic(), ev.delta.tokens if ev.HasField("delta") else None)
                )
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


async def test_a_paced_request_gets_a_delta_per_interval_and_its_first_token_at_once():
    arrivals: dict = {}
    text, tokens, deltas, _ = await _collect(pause_s=0, intervals_ms=(20, 0, 1000), arrivals=arrivals)
    expected = ("a b c " * TOKENS)[: len("a b c ") * TOKENS // 3]
    for rid in ("r0", "r1", "r2"):
        assert tokens[rid] == TOKENS and text[rid] == expected  # merged, never lost or reordered
        assert arrivals[rid][-1][1] is None  # the end comes after all of the text
    paced = arrivals["r0"]
    assert paced[0][1] <= 5  # the first token is not held for the interval (~20 steps)
    assert 2 <= deltas["r0"] <= 6  # 60 steps of 1 ms at 20 ms: 3 or 4 deltas, not 60
    # Between deltas; the last one goes out with the end, which is never held back.
    steady = paced[:-2]
    gaps = [b[0] - a[0] for a, b in zip(steady, steady[1:])]
    assert min(gaps) >= 0.010  # ticks are >= 20 ms apart; the reader may take one a little late
    assert deltas["r1"] >= TOKENS // 2  # a request without an interval beside it still gets every step
    # An interval longer than the request: its first token at once, the rest with the end, not a second later.
    assert deltas["r2"] == 2 and arrivals["r2"][-1][0] - arrivals["r2"][0][0] < 0.5


async def _events(*submits: pb.Submit) -> dict[str, list[pb.Event]]:
    """Each request's events, until all have ended."""
    session = Session(1, SyntheticEngine(MODEL, SyntheticConfig(tokens_per_s=1000, text="a b c d e")), Counters())

    async def gateway():
        yield pb.GatewayMessage(submits=list(submits))

    reader = asyncio.ensure_future(session.read(gateway()))
    out: dict[str, list[pb.Event]] = {}
    ended = 0
    async for frame in session.frames():
        for ev in frame.events:
            out.setdefault(ev.request_id, []).append(ev)
            ended += ev.WhichOneof("kind") in ("finished", "failed", "aborted")
        if ended == len(submits):
            break
    await reader
    return out


async def test_token_ids_are_reported_and_a_resumed_request_goes_on_after_them():
    hi = [pb.ChatMessage(role="user", content="hi")]
    whole = pb.Submit(request_id="w", model=MODEL, messages=hi, sampling=pb.Sampling(max_tokens=7))
    whole.report_token_ids = True
    # The same request, resumed after its first 3 tokens (by their ids), for the 4 left.
    resumed = pb.Submit(request_id="r", model=MODEL, messages=hi, sampling=pb.Sampling(max_tokens=4))
    resumed.resume_token_ids.extend([0, 1, 2])
    silent = pb.Submit(request_id="s", model=MODEL, messages=hi, sampling=pb.Sampling(max_tokens=2))
    tools = pb.Submit(request_id="t", model=MODEL, messages=hi, sampling=pb.Sampling(max_tokens=2))
    tools.tools.add(name="f")
    tools.resume_token_ids.append(0)
    got = await _events(whole, resumed, silent, tools)

    def deltas(rid):
        return [ev.delta for ev in got[rid] if ev.HasField("delta")]

    assert [i for d in deltas("w") for i in d.token_ids] == [0, 1, 2, 3, 4, 0, 1]
    assert "".join(d.text for d in deltas("w")) == "a b c d e a b "
    assert "".join(d.text for d in deltas("r")) == "d e a b "  # the whole answer's last four words
    # Usage is the rendered prompt's: the resumed output is not counted again as prompt.
    for rid in ("w", "r"):
        assert got[rid][0].accepted.prompt_tokens == got["w"][0].accepted.prompt_tokens
    assert got["r"][-1].finished.completion_tokens == 4
    assert all(not d.token_ids for d in deltas("s"))  # not asked for: not sent
    assert got["t"][-1].failed.field == "resume_token_ids"


async def test_a_request_cancelled_in_its_own_submits_message_still_ends_once():
    """A submit and its cancel in one message (a relay batches what waits behind a write in flight): the
    request's task is cancelled before it ever runs. It still ends with one Aborted, and is forgotten; the
    request beside it is untouched."""
    counters = Counters()
    session = Session(1, SyntheticEngine(MODEL, SyntheticConfig(tokens_per_s=1000, text="a b")), counters)
    hi = [pb.ChatMessage(role="user", content="hi")]

    async def gateway():
        yield pb.GatewayMessage(
            submits=[
                pb.Submit(request_id="gone", model=MODEL, messages=hi, sampling=pb.Sampling(max_tokens=50)),
                pb.Submit(request_id="kept", model=MODEL, messages=hi, sampling=pb.Sampling(max_tokens=3)),
            ],
            cancels=[pb.Cancel(request_id="gone")],
        )

    reader = asyncio.ensure_future(session.read(gateway()))
    got: dict[str, list[str]] = {}

    async def until_both_end():
        async for frame in session.frames():
            for ev in frame.events:
                got.setdefault(ev.request_id, []).append(ev.WhichOneof("kind"))
            if all(k and k[-1] in ("finished", "aborted") for k in (got.get("gone"), got.get("kept"))):
                return

    await asyncio.wait_for(until_both_end(), 5)
    await reader
    assert got["gone"] == ["aborted"], got
    assert got["kept"][-1] == "finished" and "aborted" not in got["kept"], got
    assert session.tasks == {} and session.abort_reasons == {}
    assert counters.requests_total == 2 and counters.requests_aborted_total == 1
    assert counters.active_requests == 0
