"""Unit tests of the Gateway servicer with grpcio-testing (no network, no processes).

grpcio-testing drives synchronous servicers, ours is grpc.aio; ``_SyncAdapter``
runs the real async servicer on an event loop thread and hands its responses to
grpcio-testing's fake server. The worker side is a real ``WorkerConnection``
that is never connected: the test feeds it the frames a worker would send.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import grpc
import grpc_testing
import pytest

from gateway.doors.grpc_service import GatewayService
from gateway.server import build_core
from gateway.v1 import gateway_pb2 as gpb
from igw_common.config import GatewayConfig
from igw_worker_api.v1 import worker_pb2 as wpb

SERVICE = gpb.DESCRIPTOR.services_by_name["Gateway"]
EXECUTE = SERVICE.methods_by_name["Execute"]


class _AsyncContext:
    """The async view of grpcio-testing's context that the servicer uses."""

    def __init__(self, ctx):
        self._ctx = ctx

    def time_remaining(self):
        return self._ctx.time_remaining()

    def invocation_metadata(self):
        return self._ctx.invocation_metadata()

    async def abort_with_status(self, status):
        # grpcio-testing lacks abort_with_status; this is what it amounts to.
        self._ctx.set_trailing_metadata(status.trailing_metadata)
        self._ctx.abort(status.code, status.details)


class _SyncAdapter:
    """Runs the async handler on the loop; the sync generator grpcio-testing wants pulls from it.

    Like grpc.aio, the handler waits for each response to be taken before it
    continues, and is cancelled when the client cancels.
    """

    def __init__(self, servicer, loop):
        self.servicer, self.loop = servicer, loop

    def Execute(self, request, context):
        out: queue.Queue = queue.Queue()
        taken = asyncio.Event()  # only touched on the loop

        async def drive():
            try:
                async for resp in self.servicer.Execute(request, _AsyncContext(context)):
                    out.put(("resp", resp))
                    await taken.wait()
                    taken.clear()
                out.put(("end", None))
            except BaseException as err:  # CancelledError included: the consumer must wake up
                out.put(("error", err))

        task = asyncio.run_coroutine_threadsafe(drive(), self.loop)
        context.add_callback(task.cancel)
        while True:
            kind, value = out.get()
            if kind == "end" or isinstance(value, asyncio.CancelledError):
                return
            if kind == "error":
                raise value
            yield value
            self.loop.call_soon_threadsafe(taken.set)

    def ListModels(self, request, context):
        return asyncio.run_coroutine_threadsafe(self.servicer.ListModels(request, context), self.loop).result()


@pytest.fixture
def harness():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    cfg = GatewayConfig(workers=[{"address": "10.255.255.1:1"}])

    async def make_core():
        # The server's own factory; built on the loop, as its asyncio objects need one. The worker is
        # never connected: it is made to look connected, and the test plays the worker's frames.
        core = build_core(cfg)
        w = core.workers.workers[0]
        w.info = wpb.WorkerInfo(name="w1", model="m", max_context_tokens=1000, max_concurrent_requests=4, engine="x")
        w._set_ready(True)
        return core

    core = asyncio.run_coroutine_threadsafe(make_core(), loop).result()
    servicer = GatewayService(cfg, core)
    server = grpc_testing.server_from_dictionary(
        {SERVICE: _SyncAdapter(servicer, loop)}, grpc_testing.strict_real_time()
    )
    worker = core.workers.workers[0]

    def feed(*events):
        loop.call_soon_threadsafe(worker._on_frame, wpb.WorkerFrame(events=list(events)))

    yield server, worker, feed

    async def cancel_all():
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()

    asyncio.run_coroutine_threadsafe(cancel_all(), loop).result()
    time.sleep(0.05)  # let the cancelled handlers report to their threads
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def _wait(predicate, timeout=5.0):
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout
        time.sleep(0.005)


def test_started_deltas_done_in_order(harness):
    server, worker, feed = harness
    rpc = server.invoke_unary_stream(EXECUTE, (), gpb.ExecuteRequest(task="hi", request_id="r1"), None)
    _wait(lambda: worker._submits)
    wid, sub, _ = worker._submits[0]
    assert wid != "r1" and sub.request_id == wid  # the session knows it by the gateway's id only
    assert sub.model == "m" and sub.sampling.max_tokens == 256 and sub.messages[-1].content == "hi"
    feed(
        wpb.Event(request_id=wid, accepted=wpb.Accepted(prompt_tokens=7)),
        wpb.Event(request_id=wid, delta=wpb.TokenDelta(text="he", tokens=1)),
    )
    first = rpc.take_response()
    assert first.started == gpb.Started(request_id="r1", model="m", worker="w1", prompt_tokens=7)
    assert rpc.take_response().delta == gpb.Delta(text="he", tokens=1)
    feed(
        wpb.Event(request_id=wid, delta=wpb.TokenDelta(text="llo", tokens=2)),
        wpb.Event(
            request_id=wid,
            finished=wpb.Finished(finish_reason=wpb.FINISH_REASON_STOP, prompt_tokens=7, completion_tokens=3),
        ),
    )
    assert rpc.take_response().delta.text == "llo"
    done = rpc.take_response().done
    assert done.finish_reason == gpb.FINISH_REASON_STOP
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (7, 3)
    _, code, _ = rpc.termination()
    assert code == grpc.StatusCode.OK
    assert not worker.streams and worker.outstanding_tokens == 0 and worker.in_flight == 0


def test_worker_validation_error_keeps_its_field(harness):
    server, worker, feed = harness
    rpc = server.invoke_unary_stream(EXECUTE, (), gpb.ExecuteRequest(task="hi", request_id="r2"), None)
    _wait(lambda: worker._submits)
    feed(
        wpb.Event(request_id=worker._submits[0][0], failed=wpb.Failed(code=3, message="prompt too long", field="task"))
    )
    _, code, details = rpc.termination()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details == "task: prompt too long"


def test_client_cancel_sends_cancel_to_worker(harness):
    server, worker, feed = harness
    rpc = server.invoke_unary_stream(EXECUTE, (), gpb.ExecuteRequest(task="hi", request_id="r3"), None)
    _wait(lambda: worker._submits)
    wid = worker._submits[0][0]
    worker._submits.clear()  # pretend the writer sent it
    feed(
        wpb.Event(request_id=wid, accepted=wpb.Accepted(prompt_tokens=1)),
        wpb.Event(request_id=wid, delta=wpb.TokenDelta(text="x", tokens=1)),
    )
    rpc.take_response()
    rpc.take_response()
    rpc.cancel()
    _wait(lambda: worker._cancels)
    assert [c.request_id for c in worker._cancels] == [wid]
    assert not worker.streams and worker.in_flight == 0


def test_slow_client_gets_merged_deltas(harness):
    server, worker, feed = harness
    rpc = server.invoke_unary_stream(EXECUTE, (), gpb.ExecuteRequest(task="hi", request_id="r4"), None)
    _wait(lambda: worker._submits)
    wid = worker._submits[0][0]
    feed(wpb.Event(request_id=wid, accepted=wpb.Accepted(prompt_tokens=1)))
    assert rpc.take_response().WhichOneof("event") == "started"
    # The adapter pulls one response at a time, so these pile up behind the first.
    feed(*[wpb.Event(request_id=wid, delta=wpb.TokenDelta(text=str(i), tokens=1)) for i in range(5)])
    feed(
        wpb.Event(
            request_id=wid,
            finished=wpb.Finished(finish_reason=wpb.FINISH_REASON_LENGTH, prompt_tokens=1, completion_tokens=5),
        )
    )
    texts, tokens = [], 0
    while True:
        r = rpc.take_response()
        if r.WhichOneof("event") == "done":
            break
        texts.append(r.delta.text)
        tokens += r.delta.tokens
    assert "".join(texts) == "01234" and tokens == 5
    assert len(texts) < 5


def test_no_ready_worker_is_unavailable(harness):
    server, worker, _ = harness
    worker.ready = False
    rpc = server.invoke_unary_stream(EXECUTE, (), gpb.ExecuteRequest(task="hi"), None)
    _, code, details = rpc.termination()
    assert code == grpc.StatusCode.UNAVAILABLE and "no worker" in details
    assert "10.255.255.1" not in details  # internal addresses stay in the gateway's log
