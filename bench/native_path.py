"""The native relay (``gateway.native_relay``) against the gateway without it and the bare Python relay,
same run.

    make native && python -m bench.native_path [--seconds 8] [--rounds 2] [--json FILE]

One synthetic worker at full speed (1,000 tokens/s per stream). Three paths to it, each a gRPC
``Execute`` server the same client streams through, in alternating rounds:

- ``gateway``: the gateway (``gateway.server``), API keys and in-process quotas on;
- ``native``: the same gateway, same config, with ``gateway.native_relay.enabled``: the client calls its
  native relay (``native/relay``), which carries the messages while the gateway makes every decision
  over the relay's control link; its CPU is both processes';
- ``bare relay``: ``bench.bare_relay``, the Python floor with the gateway's hops and none of its
  features (it ignores the key).

Shapes: 64 tokens per request at the default interval at 1, 64 and 256 streams, and requests of
one token at 64 streams (the per-request cost). Per path: tokens/s, TTFT p50, CPU us per token and
CPU ms per request (the path's processes, user + system), medians over the rounds; ``direct``
(straight to the worker's Session protocol) gives the TTFT and tokens/s the paths add to.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psutil
import yaml

from bench import load
from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from igw_stack import launcher as stack
from igw_worker_api.v1 import worker_pb2 as wpb
from igw_worker_api.v1 import worker_pb2_grpc as wpb_grpc

RELAY_BIN = Path(__file__).resolve().parent.parent / "native" / "relay" / "build" / "native_relay"


class Procs:
    def __init__(self, **pids: int):
        self.names = list(pids)
        self.procs = [psutil.Process(p) for p in pids.values()]

    def cpu(self) -> float:
        return sum(self.each())

    def each(self) -> list[float]:
        return [sum(p.cpu_times()[:2]) for p in self.procs]


async def _stream_forever(target, streams, max_tokens, key, stop: threading.Event, counts: list, ttfts: list):
    md = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(target) as ch:
        stub = gpb_grpc.GatewayStub(ch)

        async def client(i):
            while not stop.is_set():
                req = gpb.ExecuteRequest(task=f"{load.TASK} ({i})", sampling=gpb.SamplingParams(max_tokens=max_tokens))
                t0, first = time.monotonic(), True
                try:
                    async for r in stub.Execute(req, metadata=md, timeout=120):
                        counts[1] += 1
                        if r.HasField("delta"):
                            if first:
                                first = False
                                ttfts.append(time.monotonic() - t0)
                            counts[0] += r.delta.tokens
                    counts[2] += 1
                except grpc.aio.AioRpcError as err:
                    counts[3] += 1
                    if counts[3] < 3:
                        print(f"  {target}: {err.code().name} {err.details()}", file=sys.stderr)
                    await asyncio.sleep(0.1)

        await asyncio.gather(*(client(i) for i in range(streams)))


def measure(target: str, procs: Procs, streams: int, max_tokens: int, seconds: float, key: str) -> dict:
    stop, counts, ttfts = threading.Event(), [0, 0, 0, 0], []
    t = threading.Thread(
        target=lambda: asyncio.run(_stream_forever(target, streams, max_tokens, key, stop, counts, ttfts)), daemon=True
    )
    t.start()
    time.sleep(2)  # warm
    each0, before, t0, n0 = procs.each(), list(counts), time.monotonic(), len(ttfts)
    time.sleep(seconds)
    each, elapsed = [b - a for a, b in zip(each0, procs.each())], time.monotonic() - t0
    cpu = sum(each)
    tokens, messages, requests, errors = (a - b for a, b in zip(counts, before))
    window = ttfts[n0:]
    stop.set()
    t.join(60)
    return {
        "tokens/s": tokens / elapsed,
        "TTFT p50 ms": statistics.median(window) * 1000 if window else float("nan"),
        "CPU us per token": cpu / max(1, tokens) * 1e6,
        "CPU ms per request": cpu / max(1, requests) * 1e3,
        "errors": errors,
        **(
            {f"CPU us per token, {name}": c / max(1, tokens) * 1e6 for name, c in zip(procs.names, each)}
            if len(each) > 1
            else {}
        ),
    }


def direct(worker: str, model: str, streams: int, max_tokens: int) -> dict:
    run = asyncio.run(load.direct(worker, model, streams, max(streams * 8, 32), max_tokens))
    s = load.summary(run)
    return {"tokens/s": s["tokens_per_s"], "TTFT p50 ms": s["ttft_p50_ms"], "errors": s["errors"]}


async def _model(worker: str) -> str:
    async with grpc.aio.insecure_channel(worker) as ch:
        return (await wpb_grpc.WorkerStub(ch).Info(wpb.InfoRequest(), timeout=10)).model


def wait_answering(target: str, key: str, timeout_s: float = 60) -> None:
    async def once():
        async with grpc.aio.insecure_channel(target) as ch:
            stub = gpb_grpc.GatewayStub(ch)
            req = gpb.ExecuteRequest(task="hi", sampling=gpb.SamplingParams(max_tokens=4))
            return [r async for r in stub.Execute(req, metadata=(("authorization", f"Bearer {key}"),), timeout=5)]

    end = time.monotonic() + timeout_s
    while True:
        try:
            asyncio.run(once())
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > end:
                raise
            time.sleep(0.5)


def start_paths(log_level: str = "info"):
    """Start the worker and the paths; (processes, paths, key, worker, model)."""
    if not RELAY_BIN.exists():
        raise SystemExit(f"{RELAY_BIN} is missing: make native")
    work = Path(tempfile.mkdtemp(prefix="igw-native-"))
    keys = work / "keys.yaml"
    key = subprocess.run(
        [str(Path(sys.executable).parent / "igw-keys"), "issue", "--file", str(keys), "--tenant", "bench"]
        + ["--rpm", "100000000", "--tpm", "1000000000", "--concurrent", "100000"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    worker = f"127.0.0.1:{stack.free_port()}"
    gw, native, relay, bare = (f"127.0.0.1:{stack.free_port()}" for _ in range(4))
    cfg = {
        "worker": {
            "listen": worker,
            "engine": "synthetic",
            "synthetic": {"tokens_per_s": 1000},
            "max_concurrent_requests": 1024,
            "metrics_listen": "",
            "log_level": "warning",
        },
        "gateway": {
            "listen": gw,
            "workers": [{"address": worker}],
            "metrics_listen": "",
            "http_listen": "",
            "log_level": log_level,
            "queue": {"max_queued": 4096},
            "auth": {"mode": "api_key", "key_file": str(keys)},
        },
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cfg["gateway"].update(listen=native, native_relay={"enabled": True, "listen": relay})
    native_path = work / "config-native.yaml"
    native_path.write_text(yaml.safe_dump(cfg))
    procs = stack.Processes(path, log_dir=work)
    try:
        procs.start_worker()
        procs.start_gateway()
        py = sys.executable
        procs.start_process(
            "bare-relay", [py, "-m", "bench.bare_relay", "--listen", bare, "--worker", worker], bare, 60
        )
        procs.start_process("gateway-native", [py, "-m", "gateway.server", "--config", str(native_path)], native, 60)
        wait_answering(relay, key)
        model = asyncio.run(_model(worker))
        pid = lambda n: procs.procs[n].pid  # noqa: E731
        (relay_proc,) = psutil.Process(pid("gateway-native")).children()  # the gateway starts its relay
        paths = {
            "gateway": (gw, Procs(gateway=pid("gateway"))),
            "native": (relay, Procs(relay=relay_proc.pid, gateway=pid("gateway-native"))),
            "bare relay": (bare, Procs(relay=pid("bare-relay"))),
        }
        return procs, paths, key, worker, model
    except BaseException:
        procs.stop()
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--streams", default="1,64,256")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--log-level", default="info", help="the gateways' (info: a line per request, as deployed)")
    args = ap.parse_args(argv)
    procs, paths, key, worker, model = start_paths(args.log_level)
    try:
        shapes = [(f"{n} streams, 64 tokens", n, 64) for n in map(int, args.streams.split(","))]
        shapes.append(("64 streams, 1-token requests", 64, 1))
        out: dict = {"seconds": args.seconds, "rounds": args.rounds}
        for shape, streams, max_tokens in shapes:
            runs: dict[str, list[dict]] = {name: [] for name in paths}
            for i in range(args.rounds):
                names = list(paths)
                for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate
                    target, p = paths[name]
                    runs[name].append(measure(target, p, streams, max_tokens, args.seconds, key))
            figures = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
            if max_tokens > 1:
                figures["direct"] = direct(worker, model, streams, max_tokens)
            g = figures["gateway"]
            figures["gateway / native"] = {
                k: g[k] / max(1e-9, figures["native"][k])
                for k in ("tokens/s", "TTFT p50 ms", "CPU us per token", "CPU ms per request")
            }
            out[shape] = {name: {k: round(v, 2) for k, v in f.items()} for name, f in figures.items()}
            print(yaml.safe_dump({shape: out[shape]}, sort_keys=False), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1))
    finally:
        procs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
