"""What an open stream costs the gateway in memory, for clients that read nothing and for clients that read.

    python -m bench.slow_readers [--streams 1000] [--hold-s 10] [--max-tokens 3000]

Starts a synthetic worker (1,000 tokens/s per stream) and a gateway, then
opens ``--streams`` Execute streams straight to the gateway twice, in the
same run: once reading every message as it comes ("fast"), once reading only
the first and then nothing for ``--hold-s`` seconds ("unread"). Prints the
gateway's RSS growth per open stream for both (peak RSS during the hold minus
RSS before the streams opened). The bound the gateway aims for is 64 KiB per
stream, slow or not (docs/design.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psutil

from bench.stack_config import synthetic_stack
from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from igw_stack import launcher as stack


class PeakRss:
    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.05)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


async def hold_streams(target: str, n: int, hold_s: float, max_tokens: int, read: bool) -> int:
    """Open n streams; read them fully (read=True) or take one message each and then hold them unread.
    Returns how many streams were open at the end of the hold."""
    # One connection per 20 streams, as many clients would have: streams that read nothing fill their
    # connection's flow-control window, and a connection whose window is full carries nothing else, not
    # even the first message of a newer stream on it (a client library effect, not the gateway's).
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range((n + 19) // 20)]
    calls = []
    try:
        for first in range(0, n, 50):  # 50 at a time, each batch open (`started`) before the next
            batch = [
                gpb_grpc.GatewayStub(channels[i % len(channels)]).Execute(
                    gpb.ExecuteRequest(task=f"stream {i}", sampling=gpb.SamplingParams(max_tokens=max_tokens)),
                    timeout=hold_s + 300,
                )
                for i in range(first, min(n, first + 50))
            ]
            await asyncio.gather(*(c.read() for c in batch))
            calls += batch

        async def drain(c):
            while await c.read() is not grpc.aio.EOF:
                pass

        readers = [asyncio.create_task(drain(c)) for c in calls] if read else []
        await asyncio.sleep(hold_s)
        open_now = sum(not c.done() for c in calls)
        for c in calls:
            c.cancel()
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        return open_now
    finally:
        for ch in channels:
            await ch.close()


def measure(gateway_pid: int, target: str, n: int, hold_s: float, max_tokens: int, read: bool) -> dict:
    proc = psutil.Process(gateway_pid)
    time.sleep(1.0)  # let the previous run's streams be freed
    before = proc.memory_info().rss
    with PeakRss(gateway_pid) as peak:
        open_now = asyncio.run(hold_streams(target, n, hold_s, max_tokens, read))
    grown = max(0, peak.peak - before)
    return {
        "streams": n,
        "open_at_end_of_hold": open_now,
        "rss_before_mib": round(before / 2**20, 1),
        "peak_rss_mib": round(peak.peak / 2**20, 1),
        "kib_per_stream": round(grown / 1024 / n, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--hold-s", type=float, default=10.0)
    p.add_argument("--max-tokens", type=int, default=3000)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="igw-bench-slow-"))
    cfg, procs = synthetic_stack(
        work,
        gateway={"drain_notice_s": 0, "drain_grace_s": 1, "queue": {"max_queued": args.streams * 2}},
        worker={
            "max_concurrent_requests": args.streams * 2,
            "synthetic": {"tokens_per_s": 1000.0, "max_context_tokens": 100_000},
        },
    )
    try:
        procs.start_worker()
        results = {}
        target = cfg["gateway"]["listen"]
        for mode, read in (("fast", True), ("unread", False)):
            # A fresh gateway per mode: freed memory stays in the allocator and would flatter the second.
            procs.start_gateway()
            results[mode] = measure(
                procs.procs["gateway"].pid, target, args.streams, args.hold_s, args.max_tokens, read
            )
            stack.stop(procs.procs.pop("gateway"), 30)
            print(f"{mode:>6}: {json.dumps(results[mode])}", flush=True)
    finally:
        procs.stop()
    print(
        f"gateway memory per open stream: {results['fast']['kib_per_stream']} KiB read at full speed, "
        f"{results['unread']['kib_per_stream']} KiB unread ({args.streams} streams, {args.hold_s:g} s, "
        f"max_tokens {args.max_tokens}); target <= 64 KiB"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
