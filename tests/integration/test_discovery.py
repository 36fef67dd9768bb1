"""Workers found by DNS: joining, and leaving without cutting their streams (in-process servers, synthetic engine)."""

from __future__ import annotations

import asyncio

from gateway.core.placement import Placement
from gateway.core.scheduler import Ticket
from gateway.workers.connection import Job
from gateway.workers.membership import WorkerSet
from gateway.workers.streaming import RequestStream
from igw_common import config
from igw_stack.launcher import free_port
from igw_worker_api.v1 import worker_pb2 as wpb
from inference.server import WorkerServer, make_engine


async def start_worker(addr: str):
    cfg = config.parse(
        {
            "worker": {
                "listen": addr,
                "engine": "synthetic",
                "metrics_listen": "",
                "drain_grace_s": 1,
                "synthetic": {"tokens_per_s": 50},
            }
        }
    ).worker
    engine = make_engine(cfg)
    await engine.start()
    server = WorkerServer(cfg, engine)
    await server.start()
    return server


async def test_worker_leaving_dns_finishes_its_streams_and_takes_no_new_ones():
    a, b = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    servers = [await start_worker(a), await start_worker(b)]
    answers = {"workers.test": [a]}
    cfg = config.parse(
        {"gateway": {"worker_dns": ["workers.test:50061"], "worker_dns_refresh_s": 0.1, "drain_grace_s": 10}}
    ).gateway
    pool = WorkerSet(cfg)
    placement = Placement(pool, 100)

    async def lookup(host, port):
        return list(answers[host])

    pool._lookup = lookup
    pool.start()
    try:

        async def wait_for(pred):
            for _ in range(100):
                if pred():
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("condition not reached")

        await wait_for(lambda: [w.address for w in pool.workers if w.ready] == [a])
        model = pool.workers[0].info.model
        # A 40-token stream (0.8 s) on a.
        stream = RequestStream(40, 50)
        claim = placement.place(Ticket(model, "t", "interactive", 50), set())
        w = claim.conn
        assert w.address == a
        w.open(
            stream,
            claim,
            Job(
                model=model, messages=[wpb.ChatMessage(role="user", content="x")], sampling=wpb.Sampling(max_tokens=40)
            ),
        )
        await asyncio.sleep(0.2)
        answers["workers.test"] = [b]  # a is scaled away, b appears
        await wait_for(lambda: any(w.address == b and w.ready for w in pool.workers))
        # New requests go to b only, while a still streams.
        second = placement.place(Ticket(model, "t", "interactive", 50), set())
        assert second.conn.address == b
        second.release()
        assert any(w.address == a and w.retiring for w in pool.workers)
        updates = []
        while True:
            u = await asyncio.wait_for(stream.next(), 5)
            updates.append(u)
            if u.finish_reason or u.error:
                break
        assert updates[-1].finish_reason == "length" and stream.completion_tokens == 40
        await wait_for(lambda: [w.address for w in pool.workers] == [b])  # a closed after its stream ended
    finally:
        await pool.close()
        for s in servers:
            await s.drain()
