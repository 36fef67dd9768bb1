"""A simulated typist: what supersession saves an as-you-type completion client.

Each of ``editors`` editors types bursts of ``keys`` keystrokes, one every
``interval_s`` (150 ms), and sends a completion request (``max_tokens``
tokens) on every keystroke; after a burst it waits for the last request's
answer (the one the user sees), pauses, and types the next burst. Two modes,
measured in the same run:

- ``without``: requests carry no supersede key and the client does not
  cancel the older ones (they run to completion and are thrown away);
- ``with``: every request carries the editor's supersede key, so each
  keystroke cancels the previous request wherever it is.

Reported per mode: engine tokens generated per delivered token (tokens the
worker produced, from its own counter, over the tokens of the answers the
user saw) and TTFT p50/p99 of the last request of each burst.

    python -m bench.typist --target ENVOY --worker WORKER [--editors 8 --bursts 3 --keys 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import grpc

from bench.load import pct
from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from igw_worker_api.v1 import worker_pb2 as wpb
from igw_worker_api.v1 import worker_pb2_grpc as wpb_grpc

CODE = "def merge_sorted(a, b):\n    result = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"


async def _one(stub, req, rec: dict) -> None:
    rec["sent"] = time.monotonic()
    try:
        async for r in stub.Execute(req, timeout=600):
            if r.WhichOneof("event") == "delta" and "first" not in rec:
                rec["first"] = time.monotonic()
            elif r.WhichOneof("event") == "done":
                rec["tokens"] = r.done.usage.completion_tokens
    except grpc.aio.AioRpcError as err:
        rec["code"] = err.code().name


async def _editor(
    stub, n: int, mode: str, bursts: int, keys: int, interval_s: float, max_tokens: int, results: list, background: list
) -> None:
    typed = 0
    for _ in range(bursts):
        tasks, recs = [], []
        for _ in range(keys):
            typed += 1
            req = gpb.ExecuteRequest(
                task=f"Continue this Python code:\n{CODE[: 40 + typed]}",
                session_id=f"editor-{n}",
                supersede_key=f"editor-{n}" if mode == "with" else "",
                sampling=gpb.SamplingParams(max_tokens=max_tokens, temperature=0),
            )
            rec: dict = {}
            recs.append(rec)
            tasks.append(asyncio.create_task(_one(stub, req, rec)))
            await asyncio.sleep(interval_s)
        await tasks[-1]  # the answer the user reads
        results.append(recs[-1])
        background.extend(tasks[:-1])  # without supersession these still run; they are waited for at the end
        await asyncio.sleep(0.3)


async def run_mode(
    target: str, worker: str, mode: str, editors: int, bursts: int, keys: int, interval_s: float, max_tokens: int
) -> dict:
    async with grpc.aio.insecure_channel(worker) as wch:
        wstub = wpb_grpc.WorkerStub(wch)
        before = (await wstub.Load(wpb.LoadRequest(), timeout=10)).completion_tokens_total
        async with grpc.aio.insecure_channel(target) as ch:
            stub = gpb_grpc.GatewayStub(ch)
            results: list[dict] = []
            background: list[asyncio.Task] = []
            t0 = time.monotonic()
            await asyncio.gather(
                *(
                    _editor(stub, n, mode, bursts, keys, interval_s, max_tokens, results, background)
                    for n in range(editors)
                )
            )
            await asyncio.gather(*background)
            elapsed = time.monotonic() - t0
        while (await wstub.Load(wpb.LoadRequest(), timeout=10)).active_requests:
            await asyncio.sleep(0.05)
        engine = (await wstub.Load(wpb.LoadRequest(), timeout=10)).completion_tokens_total - before
    delivered = sum(r.get("tokens", 0) for r in results)
    ttft = [r["first"] - r["sent"] for r in results if "first" in r]
    return {
        "mode": mode,
        "editors": editors,
        "bursts": bursts,
        "keystrokes": editors * bursts * keys,
        "engine_tokens": engine,
        "delivered_tokens": delivered,
        "engine_tokens_per_delivered": round(engine / delivered, 2) if delivered else None,
        "ttft_last_p50_ms": round(pct(ttft, 0.5) * 1000, 1),
        "ttft_last_p99_ms": round(pct(ttft, 0.99) * 1000, 1),
        "lost_last_answers": sum("tokens" not in r for r in results),
        "elapsed_s": round(elapsed, 1),
    }


def run(
    target: str,
    worker: str,
    editors: int = 8,
    bursts: int = 3,
    keys: int = 6,
    interval_s: float = 0.15,
    max_tokens: int = 64,
) -> dict:
    out = {}
    for mode in ("with", "without"):
        out[mode] = asyncio.run(run_mode(target, worker, mode, editors, bursts, keys, interval_s, max_tokens))
        print(f"  typist {mode} supersession: {json.dumps(out[mode])}", flush=True)
    return out


def report_md(res: dict) -> str:
    lines = [
        "| supersession | keystrokes | engine tokens | delivered tokens | engine / delivered | "
        "TTFT p50 ms (last of burst) | TTFT p99 ms | answers lost |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in ("without", "with"):
        m = res[mode]
        lines.append(
            f"| {mode} | {m['keystrokes']} | {m['engine_tokens']} | {m['delivered_tokens']} | "
            f"{m['engine_tokens_per_delivered']} | {m['ttft_last_p50_ms']} | {m['ttft_last_p99_ms']} | "
            f"{m['lost_last_answers']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="Envoy or gateway (gRPC)")
    p.add_argument("--worker", required=True, help="the worker behind it (for its token counter)")
    p.add_argument("--editors", type=int, default=8)
    p.add_argument("--bursts", type=int, default=3)
    p.add_argument("--keys", type=int, default=6)
    args = p.parse_args(argv)
    print(report_md(run(args.target, args.worker, args.editors, args.bursts, args.keys)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
