"""The job runner in every gateway: claims stale runs, reads new jobs, runs each through the request
core at batch priority as the principal that submitted it (``gateway.state.jobs`` tells the protocol)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid

import grpc
import redis.exceptions as rexc

from gateway.core.events import Delta, Done, Started
from gateway.core.request_core import RequestCore
from gateway.doors import execute_wire
from gateway.errors import RpcError
from gateway.state.jobs import BLOCK_MS, GROUP, QUEUED_TTL_S, JobQueue, text
from gateway.state.redis import StateUnavailable, call
from gateway.v1 import gateway_pb2 as gpb
from gateway.vocabulary import BATCH
from igw_common.config import GatewayConfig

log = logging.getLogger("gateway.doors.job_runner")

# Refusals a later run may not meet: the run is given back and claimed again after claim_idle_ms.
TRANSIENT = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]  # the code a run given back or out of runs is recorded with


class _Events:
    """A run's deltas for WatchJob, merged and written at most every ``flush_ms``."""

    def __init__(self, queue: JobQueue, key: str, run: int, flush_ms: int):
        self.q, self.key, self.run, self.flush_s = queue, key + ":ev", run, flush_ms / 1000
        self.text: list[str] = []
        self.tokens = 0
        self._task: asyncio.Task | None = None
        self._sleeping = False

    def add(self, text: str, tokens: int) -> None:
        self.text.append(text)
        self.tokens += tokens
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._later())

    async def _later(self) -> None:
        while True:
            self._sleeping = True
            try:
                await asyncio.sleep(self.flush_s)
            finally:
                self._sleeping = False
            await self.flush()
            if not self.text and not self.tokens:
                return  # what came while writing goes in the next round, not with the next delta

    async def flush(self) -> None:
        if not self.text and not self.tokens:
            return
        text, tokens, self.text, self.tokens = "".join(self.text), self.tokens, [], 0
        fields = {"t": "d", "a": self.run, "x": text, "n": tokens}
        try:
            await self.q.run("job events", lambda: self.q.redis.xadd(self.key, fields, maxlen=self.q.events_max))
        except StateUnavailable as err:
            log.debug("job deltas not written for watchers: %s", err)  # the result is what counts

    async def close(self) -> None:
        """Write what is left. A write in flight is awaited, not cancelled: its text is no longer in
        ``self.text``, so cancelling it would lose it from the middle of the stream."""
        if self._task is not None and not self._task.done():
            if self._sleeping:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()


class JobRunner:
    """The consumer in each gateway: claims stale runs, reads new jobs, runs each through the core."""

    def __init__(self, cfg: GatewayConfig, core: RequestCore, queue: JobQueue, name: str):
        self.cfg, self.core, self.q = cfg, core, queue
        self.jcfg = cfg.jobs
        self.consumer = f"{name}:{uuid.uuid4().hex[:8]}"  # new per process: a restarted gateway claims like any
        self.metrics = core.metrics
        self._running: dict[asyncio.Task, tuple[str, str]] = {}  # task -> (entry id, job key)
        self._room = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._stopping = False

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        cursor, next_claim, backoff = "0-0", 0.0, 0.5
        while not self._stopping:
            try:
                await self.q.ensure_group()
                break
            except StateUnavailable as err:
                log.warning("job queue unreachable, retrying: %s", err)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
        backoff = 0.5
        while not self._stopping:
            free = self.jcfg.concurrency - len(self._running)
            if free <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                entries = []
                if loop.time() >= next_claim:
                    cursor, claimed = await self._autoclaim(cursor, free)
                    entries += claimed
                    if cursor == "0-0":  # scanned every pending entry: look again in a while
                        next_claim = loop.time() + self.jcfg.claim_idle_ms / 3000
                want = free - len(entries)
                if want > 0:
                    got = await call(
                        "job read",
                        self.q.timeout_s + BLOCK_MS / 1000,
                        lambda n=want: self.q.blocking.xreadgroup(
                            GROUP, self.consumer, {self.q.queue: ">"}, count=n, block=BLOCK_MS
                        ),
                    )
                    entries += got[0][1] if got else []
                    self.metrics.jobs_queued.set(
                        await self.q.run("job queue length", lambda: self.q.redis.xlen(self.q.queue))
                    )
                backoff = 0.5
            except StateUnavailable as err:
                if "NOGROUP" in str(err):  # the stream was deleted (FLUSHALL): make it again
                    with contextlib.suppress(StateUnavailable):
                        await self.q.ensure_group()
                self.metrics.state_store_failures.labels("jobs").inc()
                log.warning("job queue unreachable, retrying in %.1f s: %s", backoff, err)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            for entry_id, fields in entries:
                if self._stopping:
                    break  # left pending: claimed by another gateway after claim_idle_ms
                job_key = text(fields.get(b"job"))
                task = loop.create_task(self._run(text(entry_id), job_key))
                self._running[task] = (text(entry_id), job_key)
                self.metrics.jobs_running.set(len(self._running))
                task.add_done_callback(self._finished)

    async def _autoclaim(self, cursor: str, count: int):
        out = await self.q.run(
            "job claim",
            lambda: self.q.redis.xautoclaim(
                self.q.queue, GROUP, self.consumer, min_idle_time=self.jcfg.claim_idle_ms, start_id=cursor, count=count
            ),
        )
        nxt, claimed = text(out[0]), [(i, f) for i, f in out[1] if f]  # deleted entries come back empty
        return nxt, claimed

    def _finished(self, task: asyncio.Task) -> None:
        self._running.pop(task, None)
        self.metrics.jobs_running.set(len(self._running))
        self._room.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("job run failed", exc_info=task.exception())

    async def _start(self, entry_id: str, job_key: str, token: str) -> tuple | None:
        """Make this the job's current run: (run number, tenant, key id, request), or None when there
        is nothing to run (gone, finished, out of runs, or Redis unreachable: claimed again later)."""
        q = self.q
        args = [self.consumer, token, int(time.time() * 1000), self.jcfg.max_attempts, int(QUEUED_TTL_S * 1000)]
        args += [entry_id, int(self.jcfg.result_ttl_s * 1000), q.events_max, UNAVAILABLE]
        try:
            out = await q.script("start", [job_key, job_key + ":ev", q.queue], args)
        except StateUnavailable as err:
            log.warning("job %s not started (claimed again later): %s", entry_id, err)
            return None
        if int(out[0]) == -1:
            self.metrics.jobs.labels("failed").inc()
            log.warning("job %s failed: out of runs (%d)", job_key, int(out[1]))
        if int(out[0]) != 1:
            return None
        return int(out[1]), text(out[2]), text(out[3]), out[4]

    async def _run(self, entry_id: str, job_key: str) -> None:
        q, token = self.q, uuid.uuid4().hex
        events_key = job_key + ":ev"
        started = await self._start(entry_id, job_key, token)
        if started is None:
            return
        run, tenant, key_id, data = started
        self.metrics.jobs.labels("started").inc()
        if run > 1:
            self.metrics.jobs.labels("rerun").inc()
        log.info("job %s: run %d on %s", job_key, run, self.consumer)
        me = asyncio.current_task()
        lost = asyncio.Event()
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeat(job_key, entry_id, token, me, lost))
        events = _Events(q, job_key, run, self.jcfg.watch_flush_ms)
        try:
            result = await self._execute(tenant, key_id, data, events)
            await events.close()
            await self._finish(job_key, entry_id, token, "succeeded", json.dumps(result, ensure_ascii=False), 0, "")
        except RpcError as err:
            await events.close()
            if err.code in TRANSIENT and run < self.jcfg.max_attempts:
                log.info("job %s: run %d refused (%s), given back: %s", job_key, run, err.code.name, err.message)
                with contextlib.suppress(StateUnavailable):
                    await q.script(
                        "requeue", [job_key, events_key], [token, err.code.value[0], err.message, q.events_max]
                    )
                return
            await self._finish(job_key, entry_id, token, "failed", "", err.code.value[0], err.message)
        except asyncio.CancelledError:
            await events.close()
            if lost.is_set():
                self.metrics.jobs.labels("refused_stale").inc()
                log.warning("job %s: run %d stopped, another gateway runs the job now", job_key, run)
                return  # not re-raised: the task ends normally
            # Stopping: give the run back and make it claimable at once by another gateway.
            with contextlib.suppress(StateUnavailable):
                await q.script(
                    "requeue",
                    [job_key, events_key],
                    [token, UNAVAILABLE, "the gateway running it stopped", q.events_max],
                )
                await q.run(
                    "job release",
                    lambda: q.redis.xclaim(
                        q.queue, GROUP, self.consumer, 0, [entry_id], idle=self.jcfg.claim_idle_ms, justid=True
                    ),
                )
            raise
        finally:
            heartbeat.cancel()

    async def _finish(self, job_key, entry_id, token, state, result, code, message) -> None:
        q = self.q
        args = [token, state, result, code, message, int(time.time() * 1000), int(self.jcfg.result_ttl_s * 1000)]
        args += [entry_id, q.events_max]
        try:
            ok = await q.script("finish", [job_key, job_key + ":ev", q.queue], args)
        except StateUnavailable as err:
            # Not recorded: the entry stays pending and the job is rerun after claim_idle_ms.
            log.warning("job %s: result not written (rerun later): %s", job_key, err)
            return
        if int(ok):
            self.metrics.jobs.labels(state).inc()
            log.info("job %s %s", job_key, state)
        else:
            self.metrics.jobs.labels("refused_stale").inc()
            log.warning("job %s: this run's result refused: another run of the job is the current one", job_key)

    async def _heartbeat(self, job_key: str, entry_id: str, token: str, run: asyncio.Task, lost: asyncio.Event):
        while True:
            await asyncio.sleep(self.jcfg.claim_idle_ms / 3000)
            try:
                alive = await self.q.script("heartbeat", [job_key, self.q.queue], [token, self.consumer, entry_id])
            except StateUnavailable as err:
                log.warning("job heartbeat not sent: %s", err)
                continue
            if not int(alive):
                lost.set()
                run.cancel()
                return

    async def _execute(self, tenant: str, key_id: str, data: bytes, events: _Events) -> dict:
        principal = self.core.auth.principal_for(tenant, key_id)
        try:  # jobs run at batch priority, whatever the request says (it was checked at submit)
            reading = dataclasses.replace(execute_wire.draft(gpb.ExecuteRequest.FromString(data)), priority=BATCH)
        except RpcError as err:
            reading = err
        deadline = asyncio.get_running_loop().time() + self.jcfg.run_timeout_s
        text: list[str] = []
        model, done = "", None
        async with contextlib.aclosing(self.core.run((), reading, deadline, "job", principal=principal)) as stream:
            async for ev in stream:
                if isinstance(ev, Delta):
                    text.append(ev.text)
                    events.add(ev.text, ev.tokens)
                elif isinstance(ev, Started):
                    model = ev.model
                elif isinstance(ev, Done):
                    done = ev
        return {"text": "".join(text), "model": model, **dataclasses.asdict(done)}  # as job_to_proto reads it

    async def drain(self, grace_s: float) -> None:
        """Take no new jobs; running ones get ``grace_s`` to finish, the rest are given back."""
        self._stopping = True
        self._room.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, rexc.RedisError):
                await self._loop_task
        running = list(self._running)
        if running:
            _, pending = await asyncio.wait(running, timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
