"""stream_interval_ms end to end (real worker, gateway and Envoy processes, synthetic engine at 1 ms steps):
our worker merges a request's steps to its interval at the source, the first token and the end are never
held back, and a request that asked for every step, streaming beside it, still gets every step."""

from __future__ import annotations

import threading
import time

import pytest

from gateway.v1 import gateway_pb2 as gpb
from tests.helpers import make_config, running_stack

TOKENS = 120  # 120 ms of engine steps


@pytest.fixture(scope="module")
def fast_stack(tmp_path_factory):
    cfg = make_config("synthetic", worker={"synthetic": {"tokens_per_s": 1000}})
    with running_stack(tmp_path_factory.mktemp("interval-stack"), cfg) as s:
        yield s


def _stream(stub, interval_ms: int) -> tuple[list[int], str, gpb.Done, float]:
    """Deltas' token counts, the text, Done, and the seconds from the first delta to Done."""
    req = gpb.ExecuteRequest(task="count", sampling=gpb.SamplingParams(max_tokens=TOKENS))
    req.stream_interval_ms = interval_ms
    deltas, text, done, first = [], [], None, None
    for resp in stub.Execute(req, timeout=30):
        if resp.HasField("delta"):
            first = first or time.monotonic()
            deltas.append(resp.delta.tokens)
            text.append(resp.delta.text)
        elif resp.HasField("done"):
            done = resp.done
    return deltas, "".join(text), done, time.monotonic() - first


@pytest.mark.parametrize("via", ["gateway", "envoy"])
def test_a_paced_stream_gets_few_whole_deltas_and_one_beside_it_every_step(fast_stack, via):
    stub = fast_stack.gateway_stub(via)
    results: dict[int, tuple] = {}

    def run(interval_ms):
        results[interval_ms] = _stream(stub, interval_ms)

    threads = [threading.Thread(target=run, args=(i,)) for i in (40, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    paced, paced_text, paced_done, paced_s = results[40]
    every, every_text, every_done, _ = results[0]
    for deltas, done in ((paced, paced_done), (every, every_done)):
        assert sum(deltas) == TOKENS and done.usage.completion_tokens == TOKENS
    assert paced_text == every_text  # merged, never lost or reordered (the synthetic text is deterministic)
    # The first delta is not held for an interval (~40 steps); a loaded worker may merge the step or two that
    # come before its frame is written, as for any request.
    assert paced[0] <= 10
    # 120 steps of 1 ms at 40 ms: about 4 deltas, not 120 (more if a loaded machine steps slower).
    assert len(paced) <= paced_s / 0.04 + 2
    assert len(every) > 2 * len(paced)  # the stream beside it was not paced
