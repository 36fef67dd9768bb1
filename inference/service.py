"""The worker's gRPC service, ``inference.v1.Worker``: Session, Info and Load.

A ``Session`` call is one gateway's multiplexed stream (``inference.session``);
when it ends (gateway gone, connection lost), every request of that session
is aborted in the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools

from igw_common import kv_blocks, tracing
from igw_worker_api.v1 import worker_pb2 as pb
from igw_worker_api.v1 import worker_pb2_grpc as pb_grpc
from inference.engine import Engine
from inference.metrics import WorkerMetrics
from inference.session import Counters, Session


class WorkerServicer(pb_grpc.WorkerServicer):
    def __init__(
        self,
        engine: Engine,
        name: str,
        max_concurrent_requests: int,
        tracer=None,
        max_message_bytes: int = 0,
        render_threads: int = 1,
    ):
        self.engine = engine
        self.tracer = tracer or tracing.tracer(None, "igw-worker")
        self.name = name
        self.max_concurrent_requests = max_concurrent_requests
        self.max_message_bytes = max_message_bytes
        self.counters = Counters()
        self.metrics = WorkerMetrics(self.counters, engine, max_concurrent_requests)
        self.sessions: set[Session] = set()
        self._ids = itertools.count(1)
        engine.on_kv_changes = self._kv_changed
        # Chat templates and tokenizers run here, off the event loop that sends every session's frames.
        self.render_pool = (
            concurrent.futures.ThreadPoolExecutor(render_threads, thread_name_prefix="render")
            if render_threads
            else None
        )

    async def Session(self, request_iterator, context):
        session = Session(next(self._ids), self.engine, self.counters, self.metrics, self.tracer, self.render_pool)
        self.sessions.add(session)
        if self.engine.kv_blocks is not None:
            # The gateway learns the whole cache first (it may have been away while it changed).
            blocks = self.engine.kv_blocks.keys()
            session.kv_changed(kv_blocks.Changes(stored=dict.fromkeys(blocks), cleared=True))
        reader = asyncio.create_task(session.read(request_iterator))
        try:
            async for frame in session.frames():
                yield frame
        finally:
            # Gateway gone or stream broken: nobody will read these requests.
            reader.cancel()
            session.abort_all("session_closed")
            self.sessions.discard(session)

    def _kv_changed(self, changes: kv_blocks.Changes) -> None:
        for session in self.sessions:
            session.kv_changed(changes)

    async def Info(self, request, context):
        return pb.WorkerInfo(
            name=self.name,
            model=self.engine.model,
            max_context_tokens=self.engine.max_context_tokens,
            max_concurrent_requests=self.max_concurrent_requests,
            engine=self.engine.name,
            max_batch_tokens=self.engine.max_batch_tokens,
            max_message_bytes=self.max_message_bytes,
            fill_in_middle=self.engine.fim_tokens is not None,
            kv_block_size=self.engine.kv_blocks.block_size if self.engine.kv_blocks is not None else 0,
            tokenizer_path=self.engine.tokenizer_path,
        )

    async def Load(self, request, context):
        c = self.counters
        return pb.WorkerLoad(
            active_requests=c.active_requests,
            requests_total=c.requests_total,
            requests_aborted_total=c.requests_aborted_total,
            completion_tokens_total=c.completion_tokens_total,
            frames_sent_total=c.frames_sent_total,
            engine_unfinished_requests=self.engine.unfinished_requests(),
        )
