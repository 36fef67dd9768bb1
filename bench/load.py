"""Load generator: N concurrent streams, straight to a worker or through the gateway.

Both paths record, per request, the send time, the arrival time of every
delta and its token count, so TTFT, inter-token latency and delivered tokens
per second are computed the same way for both. "Direct" speaks the worker
protocol itself: one Session stream carrying all requests, as a gateway does.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import grpc

from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from igw_worker_api.v1 import worker_pb2 as wpb
from igw_worker_api.v1 import worker_pb2_grpc as wpb_grpc

TASK = "Count from 1 to 400, writing each number on its own line."


@dataclass
class Record:
    sent: float
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens)
    ok: bool = False

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0][0] - self.sent if self.arrivals else None

    def itl(self) -> list[float]:
        """Seconds per token between successive deliveries."""
        return [(b[0] - a[0]) / b[1] for a, b in zip(self.arrivals, self.arrivals[1:]) if b[1]]


@dataclass
class Run:
    records: list[Record]
    elapsed_s: float

    @property
    def tokens(self) -> int:
        return sum(n for r in self.records for _, n in r.arrivals)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s

    @property
    def errors(self) -> int:
        return sum(not r.ok for r in self.records)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summary(run: Run) -> dict:
    ttft = [r.ttft for r in run.records if r.ttft is not None]
    itl = list(itertools.chain.from_iterable(r.itl() for r in run.records))
    return {
        "requests": len(run.records),
        "errors": run.errors,
        "tokens": run.tokens,
        "elapsed_s": round(run.elapsed_s, 3),
        "tokens_per_s": round(run.tokens_per_s, 1),
        "ttft_p50_ms": round(pct(ttft, 0.5) * 1000, 2),
        "ttft_p99_ms": round(pct(ttft, 0.99) * 1000, 2),
        "itl_p50_ms": round(pct(itl, 0.5) * 1000, 3),
        "itl_p99_ms": round(pct(itl, 0.99) * 1000, 3),
        "ttft_ms_all": [round(t * 1000, 2) for t in ttft],
    }


async def direct(worker: str, model: str, concurrency: int, requests: int, max_tokens: int) -> Run:
    """``requests`` requests, ``concurrency`` at a time, over one Session stream."""
    async with grpc.aio.insecure_channel(worker) as ch:
        call = wpb_grpc.WorkerStub(ch).Session()
        records: dict[str, Record] = {}
        ids = iter(range(requests))

        async def submit(n):
            subs = []
            for _ in range(n):
                i = next(ids, None)
                if i is None:
                    break
                rid = f"b{i}"
                records[rid] = Record(sent=time.monotonic())
                subs.append(
                    wpb.Submit(
                        request_id=rid,
                        model=model,
                        messages=[wpb.ChatMessage(role="user", content=f"{TASK} ({i})")],
                        sampling=wpb.Sampling(max_tokens=max_tokens, temperature=0),
                    )
                )
            if subs:
                await call.write(wpb.GatewayMessage(submits=subs))

        t0 = time.monotonic()
        await submit(concurrency)
        ended = 0
        async for frame in call:
            now = time.monotonic()
            finished = 0
            for ev in frame.events:
                kind = ev.WhichOneof("kind")
                if kind == "delta":
                    records[ev.request_id].arrivals.append((now, ev.delta.tokens))
                elif kind in ("finished", "failed", "aborted"):
                    records[ev.request_id].ok = kind == "finished"
                    finished += 1
            ended += finished
            if ended == requests:
                break
            if finished:
                await submit(finished)
        elapsed = time.monotonic() - t0
        await call.done_writing()
        call.cancel()
    return Run(list(records.values()), elapsed)


async def via_gateway(
    target: str, concurrency: int, requests: int, max_tokens: int, stream_interval_ms: int | None = None
) -> Run:
    """``requests`` Execute calls, ``concurrency`` at a time."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = gpb_grpc.GatewayStub(ch)
        ids = iter(range(requests))
        records: list[Record] = []

        async def client():
            for i in ids:
                rec = Record(sent=time.monotonic())
                records.append(rec)
                req = gpb.ExecuteRequest(
                    task=f"{TASK} ({i})", sampling=gpb.SamplingParams(max_tokens=max_tokens, temperature=0)
                )
                if stream_interval_ms is not None:
                    req.stream_interval_ms = stream_interval_ms
                try:
                    async for resp in stub.Execute(req, timeout=600):
                        if resp.WhichOneof("event") == "delta":
                            rec.arrivals.append((time.monotonic(), resp.delta.tokens))
                        elif resp.WhichOneof("event") == "done":
                            rec.ok = True
                except grpc.aio.AioRpcError:
                    rec.ok = False

        t0 = time.monotonic()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return Run(records, time.monotonic() - t0)
