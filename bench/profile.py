"""Where a streamed token's CPU goes in the gateway: a py-spy profile under load, summarized.

    python -m bench.profile [--streams 64] [--seconds 15] [--interval-ms 0] [--out docs/profiles]

Starts a synthetic worker at full speed (1,000 tokens/s per stream) and a
gateway, streams ``--streams`` requests through the gateway for ``--seconds``,
and samples the gateway process with py-spy (native frames included, all
threads, 250 Hz). Writes ``gateway-<streams>.svg`` (a flame graph) and
prints a summary: the share of samples per area (gRPC's C core, its Cython
layer, the event loop, protobuf, our modules by file, idle) and the top
functions by self time, with CPU seconds per 1,000 tokens for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

from bench import load
from bench.stack_config import synthetic_stack

AREAS = (  # first match wins, checked against each frame from the leaf up
    ("gateway code", ("gateway/",)),
    ("protobuf", ("google/protobuf", "upb", "_message")),
    ("gRPC Cython layer", ("grpc/_cython", "cygrpc", ".pyx")),
    ("gRPC C core", ("grpc_core", "grpc_", "libgrpc", "cygrpc.cpython")),
    ("event loop", ("uvloop", "asyncio", "loop.pyx")),
    ("prometheus", ("prometheus_client",)),
)


def area(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, needles in AREAS:
            if any(n in frame for n in needles):
                return name
    return "other"


def summarize(raw: Path) -> dict:
    """Collapsed stacks (py-spy --format raw) -> shares by area, by our module, and top self frames."""
    by_area: collections.Counter = collections.Counter()
    ours: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack_text.split(";")
        total += n
        by_area[area(frames)] += n
        leaves[frames[-1]] += n
        mine = next((f for f in reversed(frames) if "gateway/" in f), None)
        if mine:
            ours[mine.split("(")[-1].split(":")[0].rsplit("/", 1)[-1]] += n
    share = lambda c: {k: round(100 * v / max(1, total), 1) for k, v in c.most_common(12)}  # noqa: E731
    return {"samples": total, "areas": share(by_area), "our_modules": share(ours), "top_self": share(leaves)}


async def stream_forever(target: str, streams: int, interval_ms: int, stop: threading.Event, tokens: list) -> None:
    """``streams`` clients streaming requests back to back until ``stop``; ``tokens[0]`` counts as they arrive."""
    import grpc

    from gateway.v1 import gateway_pb2 as gpb
    from gateway.v1 import gateway_pb2_grpc as gpb_grpc

    async with grpc.aio.insecure_channel(target) as ch:
        stub = gpb_grpc.GatewayStub(ch)

        async def client(i):
            while not stop.is_set():
                req = gpb.ExecuteRequest(task=f"{load.TASK} ({i})", sampling=gpb.SamplingParams(max_tokens=256))
                if interval_ms:
                    req.stream_interval_ms = interval_ms
                async for r in stub.Execute(req, timeout=120):
                    if r.HasField("delta"):
                        tokens[0] += r.delta.tokens

        await asyncio.gather(*(client(i) for i in range(streams)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--interval-ms", type=int, default=0, help="the requests' stream_interval_ms")
    ap.add_argument("--out", type=Path, default=Path("docs/profiles"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="igw-profile-"))
    cfg, procs = synthetic_stack(
        work,
        gateway={"queue": {"max_queued": 4096}},
        worker={"max_concurrent_requests": 1024, "synthetic": {"tokens_per_s": 1000}},
    )
    try:
        procs.start_worker()
        procs.start_gateway()
        pid = procs.procs["gateway"].pid
        gw = psutil.Process(pid)
        stop = threading.Event()
        tokens = [0]

        def drive():
            asyncio.run(stream_forever(cfg["gateway"]["listen"], args.streams, args.interval_ms, stop, tokens))

        t = threading.Thread(target=drive, daemon=True)
        t.start()
        time.sleep(3)  # warm
        cpu0, tok0 = sum(gw.cpu_times()[:2]), tokens[0]
        raw = work / "gateway.raw"
        svg = args.out / f"gateway-{args.streams}{'-i' + str(args.interval_ms) if args.interval_ms else ''}.svg"
        # Native frames need py-spy to pause the process while it samples (it runs a little slower).
        spy = [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--native",
            "--threads",
        ]
        subprocess.run(
            spy + ["--duration", str(int(args.seconds)), "--format", "raw", "--output", str(raw)],
            check=True,
            capture_output=True,
        )
        cpu_s = sum(gw.cpu_times()[:2]) - cpu0
        streamed = tokens[0] - tok0
        subprocess.run(
            spy + ["--duration", "5", "--format", "flamegraph", "--output", str(svg)], check=True, capture_output=True
        )
        stop.set()
        t.join(60)
        summary = summarize(raw)
        summary.update(
            streams=args.streams,
            interval_ms=args.interval_ms,
            gateway_cpu_s=round(cpu_s, 2),
            tokens=streamed,
            cpu_s_per_1k_tokens=round(cpu_s / max(1, streamed) * 1000, 4),
        )
        print(yaml.safe_dump(summary, sort_keys=False))
        print(f"flame graph: {svg}")
    finally:
        procs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
