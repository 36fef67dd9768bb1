"""Admission overhead of auth + quotas, as a ratio against the same gateway with them off.

    python -m bench.admission [--requests 300] [--concurrency 8]

Starts one synthetic worker, a redis-server and three gateways in front of
the worker: (1) no auth, no quotas; (2) API keys + in-process quotas;
(3) API keys + Redis quotas. Each round sends the same short requests
(max_tokens=1) to each gateway in turn, rotating the order, so noise hits
all three alike. Prints per-request latency (mean, p50, p99), throughput and
ratios against (1).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import yaml

from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from igw_stack import launcher as stack


async def run_round(addr: str, key: str | None, n: int, concurrency: int) -> list[float]:
    md = [("authorization", f"Bearer {key}")] if key else None
    lat: list[float] = []
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = gpb_grpc.GatewayStub(ch)
        sem = asyncio.Semaphore(concurrency)

        async def one():
            async with sem:
                t0 = time.perf_counter()
                async for _ in stub.Execute(
                    gpb.ExecuteRequest(task="hi", sampling=gpb.SamplingParams(max_tokens=1)), metadata=md, timeout=30
                ):
                    pass
                lat.append(time.perf_counter() - t0)

        await asyncio.gather(*(one() for _ in range(n)))
    return lat


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=300, help="requests per gateway per round")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="igw-bench-adm-"))
    procs: list[stack.Processes] = []
    redis = None
    try:
        redis_port = stack.free_port()
        redis = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
        )
        keys = work / "keys.yaml"
        key = subprocess.run(
            [
                str(Path(sys.executable).parent / "igw-keys"),
                "issue",
                "--file",
                str(keys),
                "--tenant",
                "bench",
                "--rpm",
                "10000000",
                "--tpm",
                "1000000000",
                "--concurrent",
                "10000",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        worker = f"127.0.0.1:{stack.free_port()}"
        base = {
            "worker": {
                "listen": worker,
                "engine": "synthetic",
                "synthetic": {"tokens_per_s": 1000},
                "metrics_listen": "",
            },
            "gateway": {"workers": [{"address": worker}], "metrics_listen": "", "http_listen": ""},
        }
        variants = {
            "off": {},
            "local": {"auth": {"mode": "api_key", "key_file": str(keys)}},
            "redis": {
                "auth": {"mode": "api_key", "key_file": str(keys)},
                "quota": {"store": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0"},
            },
        }
        cfg_path = work / "base.yaml"
        cfg_path.write_text(yaml.safe_dump(base))
        worker_procs = stack.Processes(cfg_path, log_dir=work)
        procs.append(worker_procs)
        worker_procs.start_worker()
        addrs = {}
        for name, gw in variants.items():
            addr = f"127.0.0.1:{stack.free_port()}"
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump({**base, "gateway": {**base["gateway"], "listen": addr, **gw}}))
            gateway = stack.Processes(path, log_dir=work)
            procs.append(gateway)
            gateway.start_gateway(name=f"gateway-{name}")
            addrs[name] = addr

        lat: dict[str, list[float]] = {k: [] for k in variants}
        wall: dict[str, float] = {k: 0.0 for k in variants}
        names = list(variants)
        for name in names:  # warm-up
            asyncio.run(run_round(addrs[name], key if name != "off" else None, 50, args.concurrency))
        for r in range(args.rounds):
            for name in names[r % 3 :] + names[: r % 3]:
                t0 = time.perf_counter()
                lat[name] += asyncio.run(
                    run_round(addrs[name], key if name != "off" else None, args.requests, args.concurrency)
                )
                wall[name] += time.perf_counter() - t0

        def pct(xs, q):
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(q * len(xs)))]

        print(
            f"\n{args.rounds} rounds x {args.requests} requests (max_tokens=1) per variant, concurrency {args.concurrency}"
        )
        print("| variant | mean ms | p50 ms | p99 ms | req/s | mean vs off | req/s vs off |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        off_mean = statistics.mean(lat["off"])
        off_rps = len(lat["off"]) / wall["off"]
        for name in names:
            mean = statistics.mean(lat[name])
            rps = len(lat[name]) / wall[name]
            print(
                f"| {name} | {mean * 1000:.2f} | {pct(lat[name], 0.5) * 1000:.2f} | {pct(lat[name], 0.99) * 1000:.2f} "
                f"| {rps:.0f} | {mean / off_mean:.3f} | {rps / off_rps:.3f} |"
            )
        for name in ("local", "redis"):
            print(
                f"admission overhead ({name}): {(statistics.mean(lat[name]) - off_mean) * 1000:+.2f} ms per request (mean)"
            )
    finally:
        for p in reversed(procs):  # gateways first, then the worker
            p.stop()
        if redis:
            stack.stop(redis, 10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
