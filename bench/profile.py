"""Where a streamed token's CPU goes in the gateway: a py-spy profile under load, summarized.

    python -m bench.profile [--streams 64] [--seconds 15] [--interval-ms 0] [--out docs/profiles]
    python -m bench.profile --costs [--streams 16] [--seconds 10]

Starts a synthetic worker at full speed (1,000 tokens/s per stream) and a
gateway, streams ``--streams`` requests through the gateway for ``--seconds``,
and samples the gateway process with py-spy (native frames included, all
threads, 250 Hz). Writes ``gateway-<streams>.svg`` (a flame graph) and
prints a summary: the share of samples per area (gRPC's C core, its Cython
layer, the event loop, protobuf, our modules by file, idle) and the top
functions by self time, with CPU seconds per 1,000 tokens for the run.

``--costs`` takes no profile (py-spy slows the process it samples); it splits the
gateway's CPU into what a request costs and what a token costs, from three runs
of ``--streams`` back-to-back requests each: requests of one token (the fixed
cost: the call, auth, quotas, queue, placement, the submit, Started, one delta
and Done), 256-token requests with a message per engine step, and the same at a
25 ms stream interval. The token figures are net of the per-request cost. The same client also
measures a bare grpc.aio server answering the same calls with nothing behind it (``bench.bare_grpc``):
the floor, so the gateway's figures read as a multiple of what gRPC itself costs on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
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
from igw_stack.launcher import free_port

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


async def stream_forever(
    target: str, streams: int, interval_ms: int | None, stop: threading.Event, counts: list, max_tokens: int = 256
) -> None:
    """``streams`` clients streaming requests back to back until ``stop``; ``counts`` = [tokens, messages,
    requests done], counted as they arrive."""
    import grpc

    from gateway.v1 import gateway_pb2 as gpb
    from gateway.v1 import gateway_pb2_grpc as gpb_grpc

    async with grpc.aio.insecure_channel(target) as ch:
        stub = gpb_grpc.GatewayStub(ch)

        async def client(i):
            while not stop.is_set():
                req = gpb.ExecuteRequest(task=f"{load.TASK} ({i})", sampling=gpb.SamplingParams(max_tokens=max_tokens))
                if interval_ms is not None:  # None: the server's default
                    req.stream_interval_ms = interval_ms
                async for r in stub.Execute(req, timeout=120):
                    counts[1] += 1
                    if r.HasField("delta"):
                        counts[0] += r.delta.tokens
                counts[2] += 1

        await asyncio.gather(*(client(i) for i in range(streams)))


class Load:
    """Requests streaming to a server (the gateway, or the bare grpc.aio floor) from a thread of this
    process, one shape at a time; the server's CPU is read from ``server``."""

    def __init__(self, target: str, server: psutil.Process):
        self.target, self.server = target, server

    def run(self, streams: int, interval_ms: int | None, max_tokens: int, seconds: float, during=None) -> dict:
        """Warm up, then measure ``seconds`` (or while ``during()`` runs): the server's CPU and what the
        clients received."""
        stop, counts = threading.Event(), [0, 0, 0]
        t = threading.Thread(
            target=lambda: asyncio.run(
                stream_forever(self.target, streams, interval_ms, stop, counts, max_tokens=max_tokens)
            ),
            daemon=True,
        )
        t.start()
        time.sleep(2)  # warm
        cpu0, before, t0 = sum(self.server.cpu_times()[:2]), list(counts), time.monotonic()
        (during or (lambda: time.sleep(seconds)))()
        cpu, elapsed = sum(self.server.cpu_times()[:2]) - cpu0, time.monotonic() - t0
        tokens, messages, requests = (a - b for a, b in zip(counts, before))
        stop.set()
        t.join(60)
        return {"cpu_s": cpu, "s": elapsed, "tokens": tokens, "messages": messages, "requests": requests}


def costs(load: Load, bare: Load, streams: int, seconds: float) -> dict:
    """The gateway's CPU per request and per token (net of the per-request cost), at ``streams`` streams,
    next to the bare grpc.aio server's for the same calls (``bench.bare_grpc``), measured in turn."""
    fixed = load.run(streams, 0, 1, seconds)
    floor = bare.run(streams, 0, 1, seconds)
    per_request = fixed["cpu_s"] / max(1, fixed["requests"])
    floor_per_request = floor["cpu_s"] / max(1, floor["requests"])
    out = {
        "streams": streams,
        "requests of 1 token": {
            "requests/s": round(fixed["requests"] / fixed["s"]),
            "gateway cores": round(fixed["cpu_s"] / fixed["s"], 2),
            "CPU ms per request": round(per_request * 1000, 2),
            "bare grpc.aio server, requests/s": round(floor["requests"] / floor["s"]),
            "bare grpc.aio server, CPU ms per request": round(floor_per_request * 1000, 2),
            "gateway / bare": round(per_request / max(1e-9, floor_per_request), 2),
        },
    }
    for name, interval_ms in (("256 tokens, a message per step", 0), ("256 tokens, 25 ms interval", 25)):
        r = load.run(streams, interval_ms, 256, seconds)
        net = max(0.0, r["cpu_s"] - per_request * r["requests"])
        out[name] = {
            "tokens/s": round(r["tokens"] / r["s"]),
            "tokens per message": round(r["tokens"] / max(1, r["messages"]), 2),
            "gateway cores": round(r["cpu_s"] / r["s"], 2),
            "CPU us per token, all in": round(r["cpu_s"] / max(1, r["tokens"]) * 1e6, 1),
            "CPU us per token, net of requests": round(net / max(1, r["tokens"]) * 1e6, 1),
        }
        if interval_ms == 0:  # the bare server sends a message per token too
            b = bare.run(streams, 0, 256, seconds)
            b_net = max(0.0, b["cpu_s"] - floor_per_request * b["requests"])
            out[name]["bare grpc.aio server, CPU us per token, net"] = round(b_net / max(1, b["tokens"]) * 1e6, 1)
    return out


def ceiling(loads: dict[str, Load], streams: int, seconds: float, rounds: int) -> dict:
    """The gateway against the bare relay (``bench.bare_relay``), from the same client, in alternating
    rounds: `make bench`'s shape (64 tokens per request at the default interval) and 1-token requests.
    Medians over ``rounds``."""
    out: dict = {"streams": streams, "rounds": rounds}
    for shape, max_tokens in (("64 tokens per request, default interval", 64), ("requests of 1 token", 1)):
        runs: dict[str, list[dict]] = {name: [] for name in loads}
        for i in range(rounds):
            for name in list(loads)[:: 1 if i % 2 == 0 else -1]:  # rotate: neither always goes first
                runs[name].append(loads[name].run(streams, None, max_tokens, seconds))
        figures = {}
        for name, rs in runs.items():
            figures[name] = {
                "tokens/s": statistics.median(r["tokens"] / r["s"] for r in rs),
                "CPU us per token": statistics.median(r["cpu_s"] / max(1, r["tokens"]) * 1e6 for r in rs),
                "CPU ms per request": statistics.median(r["cpu_s"] / max(1, r["requests"]) * 1e3 for r in rs),
                "tokens per request": statistics.median(r["tokens"] / max(1, r["requests"]) for r in rs),
            }
        g, b = figures["gateway"], figures["bare relay"]
        figures["gateway / bare relay"] = {k: g[k] / max(1e-9, b[k]) for k in g if k != "tokens per request"}
        out[shape] = {name: {k: round(v, 2) for k, v in f.items()} for name, f in figures.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--interval-ms", type=int, default=0, help="the requests' stream_interval_ms")
    ap.add_argument("--out", type=Path, default=Path("docs/profiles"))
    ap.add_argument("--costs", action="store_true", help="CPU per request and per token instead of a profile")
    ap.add_argument("--ceiling", action="store_true", help="the gateway against a bare relay instead of a profile")
    ap.add_argument("--rounds", type=int, default=3, help="--ceiling's alternating rounds")
    args = ap.parse_args(argv)
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
        load = Load(cfg["gateway"]["listen"], psutil.Process(pid))
        if args.ceiling:
            relay = f"127.0.0.1:{free_port()}"
            cmd = [sys.executable, "-m", "bench.bare_relay", "--listen", relay, "--worker", cfg["worker"]["listen"]]
            procs.start_process("bare-relay", cmd, relay, 60)
            loads = {"gateway": load, "bare relay": Load(relay, psutil.Process(procs.procs["bare-relay"].pid))}
            print(yaml.safe_dump(ceiling(loads, args.streams, args.seconds, args.rounds), sort_keys=False))
            return 0
        if args.costs:
            bare = f"127.0.0.1:{free_port()}"
            procs.start_process("bare-grpc", [sys.executable, "-m", "bench.bare_grpc", "--listen", bare], bare, 60)
            floor = Load(bare, psutil.Process(procs.procs["bare-grpc"].pid))
            print(yaml.safe_dump(costs(load, floor, args.streams, args.seconds), sort_keys=False))
            return 0
        args.out.mkdir(parents=True, exist_ok=True)
        raw = work / "gateway.raw"
        svg = args.out / f"gateway-{args.streams}{'-i' + str(args.interval_ms) if args.interval_ms else ''}.svg"
        # Native frames need py-spy to pause the process while it samples (it runs a little slower).
        spy = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--rate", "250"]
        spy += ["--native", "--threads"]

        def record():
            for form, out, seconds in (("raw", raw, int(args.seconds)), ("flamegraph", svg, 5)):
                cmd = spy + ["--duration", str(seconds), "--format", form, "--output", str(out)]
                subprocess.run(cmd, check=True, capture_output=True)

        r = load.run(args.streams, args.interval_ms, 256, args.seconds, during=record)
        summary = summarize(raw)
        summary.update(
            streams=args.streams,
            interval_ms=args.interval_ms,
            gateway_cpu_s=round(r["cpu_s"], 2),
            tokens=r["tokens"],
            cpu_s_per_1k_tokens=round(r["cpu_s"] / max(1, r["tokens"]) * 1000, 4),
        )
        print(yaml.safe_dump(summary, sort_keys=False))
        print(f"flame graph: {svg}")
    finally:
        procs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
