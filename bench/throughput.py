"""Output tokens/s of N concurrent streams: through Envoy + gateway vs straight to the worker.

    python -m bench.throughput                      # starts a vLLM worker, a gateway and Envoy itself
    python -m bench.throughput --engine synthetic   # the gateway's own overhead, no model
    python -m bench.throughput --worker H:P --target H:P   # against a running stack

Both paths run the same prompts with temperature 0, in alternating rounds in
one run (direct, envoy, direct, envoy, ...), so machine noise hits both alike.
"Direct" speaks the worker protocol itself: one Session stream, all N
submits in one message, as the gateway would. Prints a table and the ratio
of medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import yaml

from gateway import stack
from gateway import config as config_mod
from gateway.config import EnvoyConfig
from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from inference.v1 import worker_pb2 as wpb
from inference.v1 import worker_pb2_grpc as wpb_grpc

TASK = "Count from 1 to 400, writing each number on its own line."


async def direct_round(worker: str, n: int, max_tokens: int, model: str) -> tuple[int, float, list[float]]:
    async with grpc.aio.insecure_channel(worker) as ch:
        call = wpb_grpc.WorkerStub(ch).Session()
        subs = [wpb.Submit(request_id=f"d{i}", model=model,
                           messages=[wpb.ChatMessage(role="user", content=f"{TASK} ({i})")],
                           sampling=wpb.Sampling(max_tokens=max_tokens, temperature=0)) for i in range(n)]
        t0 = time.monotonic()
        await call.write(wpb.GatewayMessage(submits=subs))
        tokens, ended, ttft = 0, 0, {}
        async for frame in call:
            for ev in frame.events:
                kind = ev.WhichOneof("kind")
                if kind == "delta":
                    tokens += ev.delta.tokens
                    ttft.setdefault(ev.request_id, time.monotonic() - t0)
                elif kind in ("finished", "failed", "aborted"):
                    ended += 1
            if ended == n:
                break
        elapsed = time.monotonic() - t0
        await call.done_writing()
        call.cancel()
    return tokens, elapsed, list(ttft.values())


async def gateway_round(target: str, n: int, max_tokens: int) -> tuple[int, float, list[float]]:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = gpb_grpc.GatewayStub(ch)
        t0 = time.monotonic()

        async def one(i):
            tokens, first = 0, None
            req = gpb.ExecuteRequest(task=f"{TASK} ({i})", sampling=gpb.SamplingParams(max_tokens=max_tokens, temperature=0))
            async for resp in stub.Execute(req, timeout=600):
                if resp.WhichOneof("event") == "delta":
                    tokens += resp.delta.tokens
                    if first is None:
                        first = time.monotonic() - t0
            return tokens, first

        results = await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.monotonic() - t0
    return sum(r[0] for r in results), elapsed, [r[1] for r in results if r[1] is not None]


async def run(worker: str, target: str, n: int, max_tokens: int, rounds: int, model: str) -> dict:
    # Warm-up: first requests pay for compilation and caches.
    await direct_round(worker, n, 8, model)
    await gateway_round(target, n, 8)
    rows = {"direct": [], "envoy+gateway": []}
    for r in range(rounds):
        for name in (("direct", "envoy+gateway") if r % 2 == 0 else ("envoy+gateway", "direct")):
            if name == "direct":
                tokens, elapsed, ttft = await direct_round(worker, n, max_tokens, model)
            else:
                tokens, elapsed, ttft = await gateway_round(target, n, max_tokens)
            rows[name].append((tokens / elapsed, statistics.median(ttft) * 1000, tokens, elapsed))
            print(f"  round {r + 1} {name:14s} {tokens:5d} tokens in {elapsed:6.2f} s = {tokens / elapsed:7.1f} tok/s, "
                  f"TTFT p50 {statistics.median(ttft) * 1000:6.0f} ms", flush=True)
    med = {k: statistics.median(x[0] for x in v) for k, v in rows.items()}
    ttft = {k: statistics.median(x[1] for x in v) for k, v in rows.items()}
    print(f"\n{n} concurrent streams, max_tokens={max_tokens}, {rounds} rounds each")
    print("| path | output tok/s (median) | TTFT p50 ms (median) |\n| --- | --- | --- |")
    for k in rows:
        print(f"| {k} | {med[k]:.1f} | {ttft[k]:.0f} |")
    ratio = med["envoy+gateway"] / med["direct"]
    print(f"\nenvoy+gateway / direct output tokens/s: {ratio:.3f}")
    return {"ratio": ratio, "median_tok_s": med, "ttft_ms": ttft}


def start_stack(engine: str, workdir: Path) -> tuple[dict, list]:
    cfg = {
        "gateway": {"listen": f"127.0.0.1:{stack.free_port()}", "metrics_listen": ""},
        "worker": {"listen": f"127.0.0.1:{stack.free_port()}", "engine": engine, "metrics_listen": "",
                   "synthetic": {"tokens_per_s": 200}},
        "envoy": {"listen": f"127.0.0.1:{stack.free_port()}", "admin_listen": f"127.0.0.1:{stack.free_port()}",
                  "access_log_path": str(workdir / "access.log")},
    }
    cfg["gateway"]["workers"] = [{"address": cfg["worker"]["listen"]}]
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    procs = []
    py = sys.executable
    w = stack.start([py, "-m", "inference.server", "--config", str(path)], log_path=workdir / "worker.log")
    procs.append(w)
    stack.wait_healthy(cfg["worker"]["listen"], 600, proc=w)
    g = stack.start([py, "-m", "gateway.server", "--config", str(path)], log_path=workdir / "gateway.log")
    procs.append(g)
    stack.wait_healthy(cfg["gateway"]["listen"], 60, proc=g)
    boot = workdir / "envoy.yaml"
    boot.write_text(yaml.safe_dump(stack.load_envoy_renderer().render(config_mod.parse(cfg))))
    e = stack.start(stack.envoy_command(EnvoyConfig(), boot), log_path=workdir / "envoy.log")
    procs.append(e)
    stack.wait_healthy(cfg["envoy"]["listen"], 30, service="gateway.v1.Gateway", proc=e)
    return cfg, procs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=["vllm", "synthetic"], default="vllm")
    p.add_argument("--worker", help="worker host:port of a running stack")
    p.add_argument("--target", help="Envoy (or gateway) host:port of a running stack")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    procs = []
    try:
        if args.worker and args.target:
            worker, target = args.worker, args.target
        else:
            workdir = Path(tempfile.mkdtemp(prefix="igw-bench-"))
            print(f"starting {args.engine} worker, gateway and Envoy (logs in {workdir}) ...", flush=True)
            cfg, procs = start_stack(args.engine, workdir)
            worker, target = cfg["worker"]["listen"], cfg["envoy"]["listen"]
        asyncio.run(run(worker, target, args.concurrency, args.max_tokens, args.rounds, args.model))
    finally:
        for proc in reversed(procs):
            stack.stop(proc, 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
