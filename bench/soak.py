"""``make soak``: minutes of mixed, partly hostile load, watching for leaks.

    python -m bench.soak [--minutes 10] [--concurrency 24] [--native-relay]

Runs a synthetic worker, a gateway (API keys, Redis quotas) and Envoy, then
for ``--minutes`` sends a mix through Envoy: normal streams, streams the
client cancels mid-way, streams whose deadline passes mid-way or in the
queue, requests over a quota, oversize and invalid requests; half-way the
worker is killed (kill -9) and restarted. Every 15 s it prints the RSS of
each process. At the end it prints what leaked: concurrency leases still in
use (GetQuota), requests the engine still holds (the worker's Load), calls
and requests the native relay still holds (with ``--native-relay``), and
lost streams (a call that hung, ended with INTERNAL/UNKNOWN, or returned a
wrong token count).

A benchmark, not a test: it asserts nothing, it reports (exit code 1 if
anything leaked or was lost, so a CI job could use it).

``--native-relay``: the same with ``gateway.native_relay`` on (``make native`` first); the relay's RSS
is printed in its own column (the gateway's column is without it).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.stack_config import synthetic_stack
from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from igw_stack import launcher as stack
from igw_worker_api.v1 import worker_pb2 as wpb
from igw_worker_api.v1 import worker_pb2_grpc as wpb_grpc

EXPECTED = {
    "normal": {"OK"},
    "cancel": {"CANCELLED", "OK"},
    "deadline": {"DEADLINE_EXCEEDED", "OK"},
    "over_quota": {"RESOURCE_EXHAUSTED", "OK"},
    "oversize": {"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"},
    "invalid": {"INVALID_ARGUMENT", "NOT_FOUND"},
}
# Around the worker restart, a stream may be cut (UNAVAILABLE) or find no worker: that is correct, not lost.
DURING_RESTART = {"UNAVAILABLE"}


class Load:
    def __init__(self, target: str, keys: dict[str, str]):
        self.target, self.keys = target, keys
        self.counts: collections.Counter = collections.Counter()
        self.lost: list[str] = []
        self.restarting = False

    async def one(self, stub, kind: str) -> None:
        md = [("authorization", f"Bearer {self.keys['limited' if kind == 'over_quota' else 'main']}")]
        n = random.randint(1, 64)
        req = gpb.ExecuteRequest(
            task=f"soak {kind}", sampling=gpb.SamplingParams(max_tokens=n), session_id=str(random.randint(0, 50))
        )
        timeout = 60.0
        if kind == "deadline":
            timeout = random.choice([0.01, 0.1, 0.3])
        elif kind == "oversize":
            req.messages.extend([gpb.ChatMessage(role="user", content="x" * 30_000)] * random.choice([40, 200]))
        elif kind == "invalid":
            req = random.choice(
                [
                    gpb.ExecuteRequest(),
                    gpb.ExecuteRequest(task="x", model="nope"),
                    gpb.ExecuteRequest(task="x", sampling=gpb.SamplingParams(temperature=9)),
                ]
            )
        code, tokens, done_tokens = "OK", 0, None
        call = stub.Execute(req, metadata=md, timeout=timeout)
        try:
            cut_after = random.randint(1, max(1, n - 1)) if kind == "cancel" else None
            async for r in call:
                if r.WhichOneof("event") == "delta":
                    tokens += r.delta.tokens
                    if cut_after is not None and tokens >= cut_after:
                        call.cancel()
                        code = "CANCELLED"
                        break
                elif r.WhichOneof("event") == "done":
                    done_tokens = r.done.usage.completion_tokens
        except grpc.aio.AioRpcError as err:
            code = err.code().name
        self.counts[(kind, code)] += 1
        ok = code in EXPECTED[kind] or (self.restarting and code in DURING_RESTART)
        if code == "OK" and done_tokens != tokens:
            ok = False
        if code == "DEADLINE_EXCEEDED" and timeout >= 60:
            ok = False
        if not ok:
            self.lost.append(f"{kind}: {code} after {tokens} tokens")

    async def client(self, until: float) -> None:
        async with grpc.aio.insecure_channel(self.target) as ch:
            stub = gpb_grpc.GatewayStub(ch)
            kinds = ["normal"] * 5 + ["cancel"] * 2 + ["deadline"] * 2 + ["over_quota", "oversize", "invalid"]
            while time.monotonic() < until:
                await self.one(stub, random.choice(kinds))


def rss_mib(proc: subprocess.Popen, relay: bool | None = None) -> float:
    """The RSS of ``proc`` and its children; ``relay`` True: of its native relay alone, False: without it."""
    try:
        p = psutil.Process(proc.pid)
        procs = [p, *p.children(recursive=True)]
        if relay is not None:
            procs = [c for c in procs if (c.name() == "native_relay") == relay]
        return sum(c.memory_info().rss for c in procs) / 2**20
    except psutil.NoSuchProcess:
        return float("nan")


def relay_tables(metrics_listen: str) -> dict[str, float]:
    """What the native relay holds, as the gateway's metrics have it (igw_native_relay_*)."""
    text = urllib.request.urlopen(f"http://{metrics_listen}/metrics", timeout=5).read().decode()
    return {
        s.name.removeprefix("igw_native_relay_"): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name.startswith("igw_native_relay_") and s.name != "igw_native_relay_resident_memory_bytes"
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--native-relay", action="store_true", help="with gateway.native_relay on")
    args = ap.parse_args(argv)
    random.seed(7)

    work = Path(tempfile.mkdtemp(prefix="igw-soak-"))
    redis_port = stack.free_port()
    redis = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(work),
        ],
        stdout=subprocess.DEVNULL,
    )
    keys_file = work / "keys.yaml"
    igw_keys = [str(Path(sys.executable).parent / "igw-keys"), "--file", str(keys_file)]
    subprocess.run(igw_keys[:1] + ["tenant", "--file", str(keys_file), "soak", "--concurrent", "200"], check=True)
    keys = {
        "main": subprocess.run(
            igw_keys[:1] + ["issue", "--file", str(keys_file), "--tenant", "soak", "--concurrent", "100"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip(),
        "limited": subprocess.run(
            igw_keys[:1] + ["issue", "--file", str(keys_file), "--tenant", "soak", "--rpm", "30", "--tpm", "3000"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip(),
    }
    cfg, procs = synthetic_stack(
        work,
        gateway={
            "auth": {"mode": "api_key", "key_file": str(keys_file)},
            "quota": {"store": "redis", "redis_url": f"redis://127.0.0.1:{redis_port}/0"},
            "worker_reconnect_backoff_ms": 200,
            "metrics_listen": f"127.0.0.1:{stack.free_port()}",
            **(
                {"native_relay": {"enabled": True, "listen": f"127.0.0.1:{stack.free_port()}"}}
                if args.native_relay
                else {}
            ),
        },
        worker={"synthetic": {"tokens_per_s": 200}},
        envoy={"access_log_path": "/dev/null"},
    )
    load = Load(cfg["envoy"]["listen"], keys)
    status = 0
    try:
        procs.start_worker()
        procs.start_gateway()
        procs.start_envoy()
        t0 = time.monotonic()
        until = t0 + args.minutes * 60

        async def drive():
            clients = [asyncio.create_task(load.client(until)) for _ in range(args.concurrency)]
            restarted = False
            print(
                "  t (s) | gateway MiB | worker MiB | envoy MiB | calls" + (" | relay MiB" * args.native_relay),
                flush=True,
            )
            next_sample = t0
            while not all(c.done() for c in clients):
                now = time.monotonic()
                if now >= next_sample:
                    print(
                        f"{now - t0:7.0f} | {rss_mib(procs.procs['gateway'], relay=False):11.1f} | "
                        f"{rss_mib(procs.procs['worker']):10.1f} | {rss_mib(procs.procs['envoy']):9.1f} | "
                        f"{sum(load.counts.values())}"
                        + (f" | {rss_mib(procs.procs['gateway'], relay=True):.1f}" if args.native_relay else ""),
                        flush=True,
                    )
                    next_sample += 15
                if not restarted and now - t0 > args.minutes * 30:
                    restarted, load.restarting = True, True
                    print("        worker: kill -9 and restart", flush=True)
                    procs.procs.pop("worker").kill()
                    await asyncio.to_thread(procs.start_worker)
                    await asyncio.sleep(3)
                    load.restarting = False
                await asyncio.sleep(0.5)
            await asyncio.gather(*clients)

        asyncio.run(drive())
        time.sleep(2)  # settles are written in the background
        with grpc.insecure_channel(cfg["envoy"]["listen"]) as ch:
            stub = gpb_grpc.GatewayStub(ch)
            leases = {}
            for name, key in keys.items():
                q = stub.GetQuota(gpb.GetQuotaRequest(), metadata=[("authorization", f"Bearer {key}")], timeout=5)
                for b in q.budgets:
                    leases[f"{name}:{b.scope}"] = b.concurrent_streams_in_use
        with grpc.insecure_channel(cfg["worker"]["listen"]) as ch:
            w = wpb_grpc.WorkerStub(ch).Load(wpb.LoadRequest(), timeout=5)
        print("\ncalls by kind and status:")
        for (kind, code), n in sorted(load.counts.items()):
            print(f"  {kind:>10} {code:<20} {n}")
        print(f"leases in use at the end: {leases}")
        print(f"engine at the end: {w.active_requests} active, {w.engine_unfinished_requests} unfinished")
        relay_held = {}
        if args.native_relay:
            time.sleep(1)  # the relay reports what it holds with each ping (every core_timeout_ms / 4)
            tables = relay_tables(cfg["gateway"]["metrics_listen"])
            print(f"native relay at the end: {tables}")
            relay_held = {k: v for k, v in tables.items() if k in ("calls", "bound_requests") and v}
        print(f"lost streams: {len(load.lost)} of {sum(load.counts.values())}")
        for line in load.lost[:20]:
            print(f"  {line}")
        alive = procs.exited()
        print(f"processes alive: {'all' if alive is None else f'{alive} exited'}")
        if (
            any(leases.values())
            or w.active_requests
            or w.engine_unfinished_requests
            or load.lost
            or alive
            or relay_held
        ):
            status = 1
    finally:
        procs.stop()
        redis.terminate()
        redis.wait(10)
    return status


if __name__ == "__main__":
    sys.exit(main())
