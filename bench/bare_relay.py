"""A bare relay: gateway.v1's Execute passed to one worker over the worker protocol, and nothing else.
The ceiling of a Python grpc.aio gateway with this design on a machine: the same hops and messages as
the gateway (client call, a shared Session stream to the worker, Started / Delta / Done), without auth,
quotas, queue, placement, retries, metrics, tracing or logs. ``python -m bench.profile --ceiling``
streams through it and through the gateway in turn, from the same client.

    python -m bench.bare_relay --listen 127.0.0.1:PORT --worker 127.0.0.1:PORT

Not a server to deploy: it checks nothing a client sends beyond bounding max_tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys

import grpc
import uvloop

from bench import bare_grpc
from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc
from igw_worker_api.v1 import worker_pb2 as wpb
from igw_worker_api.v1 import worker_pb2_grpc as wpb_grpc

MAX_TOKENS = 4096
DEFAULT_INTERVAL_MS = 10  # the gateway's default stream_interval_ms


class BareRelay(gpb_grpc.GatewayServicer):
    def __init__(self, worker: str):
        self.worker = worker
        self.ids = itertools.count(1)
        self.streams: dict[str, asyncio.Queue] = {}
        self.submits: list[wpb.Submit] = []
        self.wake = asyncio.Event()

    async def start(self) -> None:
        channel = grpc.aio.insecure_channel(self.worker)
        stub = wpb_grpc.WorkerStub(channel)
        self.info = await stub.Info(wpb.InfoRequest(), wait_for_ready=True, timeout=60)
        self.call = stub.Session()
        self.tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._write())]

    async def _read(self) -> None:
        async for frame in self.call:
            for ev in frame.events:
                queue = self.streams.get(ev.request_id)
                if queue is not None:
                    queue.put_nowait(ev)

    async def _write(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.submits:
                submits, self.submits = self.submits, []
                await self.call.write(wpb.GatewayMessage(submits=submits))

    async def Execute(self, request, context):
        rid = str(next(self.ids))
        queue = self.streams[rid] = asyncio.Queue()
        interval = request.stream_interval_ms if request.HasField("stream_interval_ms") else DEFAULT_INTERVAL_MS
        self.submits.append(
            wpb.Submit(
                request_id=rid,
                model=self.info.model,
                messages=[wpb.ChatMessage(role="user", content=request.task)],
                sampling=wpb.Sampling(max_tokens=max(1, min(request.sampling.max_tokens or 64, MAX_TOKENS))),
                stream_interval_ms=interval,
            )
        )
        self.wake.set()
        try:
            while True:
                ev = await queue.get()
                kind = ev.WhichOneof("kind")
                if kind == "delta":
                    yield gpb.ExecuteResponse(delta=gpb.Delta(text=ev.delta.text, tokens=ev.delta.tokens))
                elif kind == "accepted":
                    yield gpb.ExecuteResponse(
                        started=gpb.Started(
                            request_id=rid,
                            model=self.info.model,
                            worker=self.worker,
                            prompt_tokens=ev.accepted.prompt_tokens,
                        )
                    )
                elif kind == "finished":
                    f = ev.finished
                    usage = gpb.Usage(prompt_tokens=f.prompt_tokens, completion_tokens=f.completion_tokens)
                    yield gpb.ExecuteResponse(done=gpb.Done(finish_reason=gpb.FINISH_REASON_LENGTH, usage=usage))
                    return
                else:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"the worker ended the request ({kind})")
        finally:
            self.streams.pop(rid, None)


async def serve(listen: str, worker: str) -> None:
    relay = BareRelay(worker)
    await relay.start()
    await bare_grpc.serve(listen, relay)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="host:port")
    ap.add_argument("--worker", required=True, help="the worker's host:port")
    args = ap.parse_args(argv)
    uvloop.run(serve(args.listen, args.worker))
    return 0


if __name__ == "__main__":
    sys.exit(main())
