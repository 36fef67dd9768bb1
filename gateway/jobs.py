"""Durable background jobs (``gateway.jobs``): SubmitJob, GetJob, WatchJob, and the runner in every gateway.

The queue is a Redis Stream with one consumer group; a job survives the gateway that accepted or ran
it, and needs Redis to (with persistence, ``appendonly yes``, to survive a Redis restart too).

- **Submit** authenticates and validates the request as Execute would, then one script writes the
  job's hash and appends its entry to the stream (both or neither), so the client holds a job id that
  will run. A client-chosen ``job_id`` is an idempotency key: the same id again returns the existing
  job (ALREADY_EXISTS if the request differs).
- **Run**: each gateway runs up to ``concurrency`` jobs, read with ``XREADGROUP``; a job runs through
  the request core (``Dispatcher.execute``) at batch priority as the principal that submitted it, so
  quotas, budgets, fairness, metrics and the log line apply as to Execute. A run holds a token: the
  start script gives each run a new one, and only the holder of the current token may record a
  result, so a result is written once, whatever runs in parallel.
- **Crash**: a running job's stream entry stays pending (unacknowledged) with its gateway, which
  heartbeats it (``XCLAIM`` to itself, resetting its idle time) every ``claim_idle_ms``/3. A gateway
  that dies stops heartbeating; after ``claim_idle_ms`` another gateway claims the entry
  (``XAUTOCLAIM``) and reruns the job from the start with a new token. A gateway that was only frozen
  (a zombie) learns at its next heartbeat that its token is stale and stops; if it finishes first its
  result is refused (``refused_stale``). Runs are counted; after ``max_attempts`` the job fails.
- **Transient refusals** (quota, budget, no worker, queue full) give the run back: the entry stays
  pending without heartbeats and is claimed again after ``claim_idle_ms`` (a natural backoff).
- **Results** are written with the job's state by the finishing script, which also acknowledges and
  deletes the stream entry; they expire after ``result_ttl_s``.
- **WatchJob** reads a per-job events stream (``XREAD BLOCK``): a marker when a run starts (with its
  number), the run's deltas (merged, written every ``watch_flush_ms``), a marker when it finishes. A
  stream rather than pub/sub because a watcher may connect at any time, or reconnect, and must still
  see the current run from its start: pub/sub delivers only what is published while one listens. The
  events stream keeps at most ``gateway.limits.max_tokens_limit`` entries and expires with the job.

Keys (all in one hash slot, ``{jobs}``, so each script may touch the queue and a job on Redis Cluster)::

    <prefix>{jobs}:queue                        the stream (group "igw")
    <prefix>{jobs}:job:<tenant>:<job id>        the job: state, request, runs, result
    <prefix>{jobs}:job:<tenant>:<job id>:ev     its events for WatchJob

The tenant is part of the key: another tenant's job id is NOT_FOUND, never its content.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid

import grpc
import redis.exceptions as rexc

from gateway import validation
from gateway.dispatch import Delta, Dispatcher, Done, Started
from gateway.errors import RpcError, clip, invalid_argument, permission_denied, resource_exhausted, unavailable
from gateway.redis_state import StateUnavailable, call, client, esc
from gateway.v1 import gateway_pb2 as gpb
from gateway.vocabulary import BATCH, FINISH_TO_PUBLIC
from igw_common.config import GatewayConfig

log = logging.getLogger("gateway.jobs")

GROUP = "igw"
QUEUED_TTL_S = 7 * 86_400  # a job not finished within a week is forgotten (its result could not be read anyway)
BLOCK_MS = 1_000  # longest blocking read: how soon a stopping runner or a watcher notices
# Refusals a later run may not meet: the run is given back and claimed again after claim_idle_ms.
TRANSIENT = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
STATES = {
    "queued": gpb.JOB_STATE_QUEUED,
    "running": gpb.JOB_STATE_RUNNING,
    "succeeded": gpb.JOB_STATE_SUCCEEDED,
    "failed": gpb.JOB_STATE_FAILED,
}

# KEYS: job, queue. ARGV: tenant, key id, request, request hash, now (ms), max queued, TTL (ms).
# Returns 1 queued, 0 exists (same request), -1 exists with another request, -2 queue full.
_SUBMIT = """
local st = redis.call('HGET', KEYS[1], 'st')
if st then
  if redis.call('HGET', KEYS[1], 'rh') ~= ARGV[4] then return -1 end
  return 0
end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[6]) then return -2 end
local id = redis.call('XADD', KEYS[2], '*', 'job', KEYS[1])
redis.call('HSET', KEYS[1], 'st', 'queued', 'tenant', ARGV[1], 'key', ARGV[2], 'req', ARGV[3], 'rh', ARGV[4],
  'created', ARGV[5], 'att', 0, 'entry', id)
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return 1
"""

# KEYS: job, events, queue. ARGV: consumer, token, now (ms), max attempts, TTL (ms), entry id, result TTL (ms),
# events max length. Returns {0} (gone or finished: entry dropped), {-1, runs} (out of runs: failed), or
# {1, run, tenant, key id, request}.
_START = """
local function drop()
  redis.call('XACK', KEYS[3], 'igw', ARGV[6])
  redis.call('XDEL', KEYS[3], ARGV[6])
end
local st = redis.call('HGET', KEYS[1], 'st')
if not st or st == 'succeeded' or st == 'failed' then drop() return {0} end
local run = redis.call('HINCRBY', KEYS[1], 'att', 1)
if run > tonumber(ARGV[4]) then
  local why = redis.call('HGET', KEYS[1], 'emsg')
  if not why or why == '' then why = 'the gateways running it stopped before it finished' end
  redis.call('HSET', KEYS[1], 'att', run - 1, 'st', 'failed', 'tok', '', 'finished', ARGV[3],
    'emsg', 'gave up after ' .. (run - 1) .. ' runs; the last: ' .. why)
  if not redis.call('HGET', KEYS[1], 'ecode') then redis.call('HSET', KEYS[1], 'ecode', 14) end
  redis.call('HDEL', KEYS[1], 'req')
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 't', 'f')
  redis.call('PEXPIRE', KEYS[2], ARGV[7])
  drop()
  return {-1, run - 1}
end
redis.call('HSET', KEYS[1], 'st', 'running', 'tok', ARGV[2], 'owner', ARGV[1], 'started', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 't', 's', 'a', run)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return {1, run, redis.call('HGET', KEYS[1], 'tenant'), redis.call('HGET', KEYS[1], 'key'),
  redis.call('HGET', KEYS[1], 'req')}
"""

# KEYS: job, events, queue. ARGV: token, state, result JSON, error code, error message, now (ms), result TTL
# (ms), entry id, events max length. Returns 1 recorded, 0 refused (not the current run: stale).
_FINISH = """
if redis.call('HGET', KEYS[1], 'st') ~= 'running' or redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'st', ARGV[2], 'res', ARGV[3], 'ecode', ARGV[4], 'emsg', ARGV[5], 'finished', ARGV[6],
  'tok', '')
redis.call('HDEL', KEYS[1], 'req')
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[9], '*', 't', 'f')
redis.call('PEXPIRE', KEYS[2], ARGV[7])
redis.call('XACK', KEYS[3], 'igw', ARGV[8])
redis.call('XDEL', KEYS[3], ARGV[8])
return 1
"""

# KEYS: job, events. ARGV: token, error code, error message, events max length. Gives the run back (the
# entry stays pending and is claimed again). Returns 1, or 0 if not the current run.
_REQUEUE = """
if redis.call('HGET', KEYS[1], 'st') ~= 'running' or redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'st', 'queued', 'tok', '', 'ecode', ARGV[2], 'emsg', ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 't', 'q')
return 1
"""

# KEYS: job, queue. ARGV: token, consumer, entry id. Resets the entry's idle time while this run is the
# job's current one; 0 when it is not (another gateway reran it): stop.
_HEARTBEAT = """
if redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then return 0 end
redis.call('XCLAIM', KEYS[2], 'igw', ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else (v or "")


def request_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class JobQueue:
    """The Redis side: keys, scripts, and the protos of what is stored."""

    def __init__(self, cfg: GatewayConfig, url: str):
        self.cfg = cfg.jobs
        self.timeout_s = cfg.jobs.redis_timeout_ms / 1000
        self.redis = client(url, self.timeout_s)
        self.blocking = client(url, self.timeout_s, blocking_s=BLOCK_MS / 1000)  # XREADGROUP/XREAD BLOCK
        self.tag = f"{cfg.jobs.redis_key_prefix}{{jobs}}"
        self.queue = self.tag + ":queue"
        self.events_max = cfg.limits.max_tokens_limit + 16  # a whole run: every delta carries >= 1 token
        self.scripts = {
            name: self.redis.register_script(src)
            for name, src in (
                ("submit", _SUBMIT),
                ("start", _START),
                ("finish", _FINISH),
                ("requeue", _REQUEUE),
                ("heartbeat", _HEARTBEAT),
            )
        }

    def job_key(self, tenant: str, job_id: str) -> str:
        return f"{self.tag}:job:{esc(tenant)}:{esc(job_id)}"

    async def run(self, what: str, coro_fn):
        return await call(what, self.timeout_s, coro_fn)

    async def script(self, name: str, keys: list, args: list):
        return await self.run(f"job {name}", lambda: self.scripts[name](keys=keys, args=args))

    async def ensure_group(self) -> None:
        try:
            # From the stream's start: entries added before any gateway created the group still run.
            await self.run("job group", lambda: self.redis.xgroup_create(self.queue, GROUP, id="0", mkstream=True))
        except StateUnavailable as err:
            if "BUSYGROUP" not in str(err):
                raise

    async def load(self, tenant: str, job_id: str) -> dict | None:
        raw = await self.run("job read", lambda: self.redis.hgetall(self.job_key(tenant, job_id)))
        return {_s(k): v for k, v in raw.items()} if raw else None

    @staticmethod
    def to_proto(job_id: str, h: dict) -> gpb.Job:
        job = gpb.Job(
            job_id=job_id,
            state=STATES.get(_s(h.get("st")), gpb.JOB_STATE_UNSPECIFIED),
            attempts=int(h.get("att") or 0),
            created_unix_ms=int(h.get("created") or 0),
            finished_unix_ms=int(h.get("finished") or 0),
        )
        if job.state == gpb.JOB_STATE_SUCCEEDED and h.get("res"):
            r = json.loads(h["res"])
            job.result.CopyFrom(
                gpb.JobResult(
                    text=r["text"],
                    model=r["model"],
                    done=gpb.Done(
                        finish_reason=FINISH_TO_PUBLIC.get(r["finish_reason"], gpb.FINISH_REASON_UNSPECIFIED),
                        usage=gpb.Usage(prompt_tokens=r["prompt_tokens"], completion_tokens=r["completion_tokens"]),
                        timings=gpb.Timings(queue_ms=r["queue_ms"], ttft_ms=r["ttft_ms"], total_ms=r["total_ms"]),
                        cost_micros=r["cost_micros"],
                        cache_hit=r["cache_hit"],
                    ),
                )
            )
        elif job.state == gpb.JOB_STATE_FAILED:
            job.error.CopyFrom(gpb.JobError(code=int(h.get("ecode") or 0), message=_s(h.get("emsg"))))
        return job

    async def close(self) -> None:
        await self.redis.aclose()
        await self.blocking.aclose()


class JobService:
    """What the RPCs do; ``gateway.service`` maps them onto gRPC."""

    def __init__(self, cfg: GatewayConfig, core: Dispatcher, queue: JobQueue):
        self.cfg, self.core, self.queue = cfg, core, queue

    def _unavailable(self, err: StateUnavailable) -> RpcError:
        self.core.metrics.state_store_failures.labels("jobs").inc()
        log.warning("job store unavailable: %s", err)
        return unavailable("the job store (Redis) is unreachable; retry shortly", 1.0, reason="job_store")

    @staticmethod
    def _check_id(job_id: str) -> None:
        if not validation.REQUEST_ID.fullmatch(job_id):
            raise invalid_argument("job_id", "use 1-128 characters from A-Z a-z 0-9 . _ : -")

    async def submit(self, headers, req: gpb.SubmitJobRequest) -> gpb.Job:
        principal = self.core.auth.authenticate(headers)
        if req.job_id:
            self._check_id(req.job_id)
        if not req.HasField("request"):
            raise invalid_argument("request", "the request to run is missing")
        if req.request.supersede_key:
            raise invalid_argument("request.supersede_key", "jobs cannot be superseded; leave it empty")
        try:
            valid = validation.validate(req.request, self.cfg.limits)
        except RpcError as err:
            if not err.field:
                raise
            raise invalid_argument("request." + err.field, err.message.split(": ", 1)[-1]) from None
        if valid.model and not principal.may_use(valid.model):
            raise permission_denied(f"request.model: this caller may not use model {valid.model!r}")
        stored = gpb.ExecuteRequest()
        stored.CopyFrom(req.request)
        stored.priority = gpb.PRIORITY_BATCH
        data = stored.SerializeToString(deterministic=True)
        job_id = req.job_id or uuid.uuid4().hex
        key = self.queue.job_key(principal.tenant, job_id)
        now_ms = int(time.time() * 1000)
        try:
            out = await self.queue.script(
                "submit",
                [key, self.queue.queue],
                [
                    principal.tenant,
                    principal.key_id,
                    data,
                    request_hash(data),
                    now_ms,
                    self.cfg.jobs.max_queued,
                    int(QUEUED_TTL_S * 1000),
                ],
            )
            if int(out) == -1:
                raise RpcError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"job_id: job {job_id} was submitted before with a different request; use a new job_id",
                    reason="job_exists",
                )
            if int(out) == -2:
                raise resource_exhausted(
                    f"the job queue is full ({self.cfg.jobs.max_queued} jobs waiting or running)",
                    10.0,
                    [("gateway:jobs", "job queue full")],
                    reason="job_queue_full",
                )
            if int(out) == 1:
                # The job as created. Read back, it could already be running: a runner may take it at once.
                self.core.metrics.jobs.labels("submitted").inc()
                return gpb.Job(job_id=job_id, state=gpb.JOB_STATE_QUEUED, created_unix_ms=now_ms)
            h = await self.queue.load(principal.tenant, job_id)  # a repeat: the job as it stands
        except StateUnavailable as err:
            raise self._unavailable(err) from None
        if h is None:  # expired between the two calls (only if its TTL was tiny): it was accepted
            return gpb.Job(job_id=job_id, state=gpb.JOB_STATE_QUEUED)
        return self.queue.to_proto(job_id, h)

    async def get(self, headers, job_id: str) -> gpb.Job:
        principal = self.core.auth.authenticate(headers)
        self._check_id(job_id)
        try:
            h = await self.queue.load(principal.tenant, job_id)
        except StateUnavailable as err:
            raise self._unavailable(err) from None
        if h is None:
            raise _not_found(job_id)
        return self.queue.to_proto(job_id, h)

    async def watch(self, headers, job_id: str):
        """Yields WatchJobResponse messages until the job is finished."""
        principal = self.core.auth.authenticate(headers)
        self._check_id(job_id)
        q = self.queue
        key = q.job_key(principal.tenant, job_id)
        try:
            h = await q.load(principal.tenant, job_id)
            if h is None:
                raise _not_found(job_id)
            job = q.to_proto(job_id, h)
            yield gpb.WatchJobResponse(status=job)
            if job.state in (gpb.JOB_STATE_SUCCEEDED, gpb.JOB_STATE_FAILED):
                return
            # What the current run wrote so far: from its start marker on.
            history = await q.run("job events", lambda: q.redis.xrange(key + ":ev", "-", "+"))
            starts = [i for i, (_, f) in enumerate(history) if f.get(b"t") == b"s"]
            run, last_id = job.attempts, "0-0"
            if history:
                last_id = history[-1][0]
                history = history[starts[-1] :] if starts else history
            pending = history
            while True:
                for _, f in pending:
                    kind = f.get(b"t")
                    if kind == b"s":
                        run = int(f.get(b"a", 0))
                        yield gpb.WatchJobResponse(
                            status=gpb.Job(job_id=job_id, state=gpb.JOB_STATE_RUNNING, attempts=run)
                        )
                    elif kind == b"d" and int(f.get(b"a", 0)) == run:
                        yield gpb.WatchJobResponse(delta=gpb.Delta(text=_s(f.get(b"x")), tokens=int(f.get(b"n", 0))))
                    elif kind == b"q":
                        yield gpb.WatchJobResponse(
                            status=gpb.Job(job_id=job_id, state=gpb.JOB_STATE_QUEUED, attempts=run)
                        )
                    elif kind == b"f":
                        h = await q.load(principal.tenant, job_id)
                        if h is not None:
                            yield gpb.WatchJobResponse(status=q.to_proto(job_id, h))
                        return
                got = await call(
                    "job watch",
                    q.timeout_s + BLOCK_MS / 1000,
                    lambda since=last_id: q.blocking.xread({key + ":ev": since}, count=256, block=BLOCK_MS),
                )
                pending = got[0][1] if got else []
                if pending:
                    last_id = pending[-1][0]
                else:  # quiet: the job may have finished while its events were trimmed or expired
                    h = await q.load(principal.tenant, job_id)
                    if h is None:
                        raise _not_found(job_id)
                    if _s(h.get("st")) in ("succeeded", "failed"):
                        yield gpb.WatchJobResponse(status=q.to_proto(job_id, h))
                        return
        except StateUnavailable as err:
            raise self._unavailable(err) from None


def _not_found(job_id: str) -> RpcError:
    return RpcError(
        grpc.StatusCode.NOT_FOUND,
        f"job_id: no job {clip(job_id)} for this caller (unknown, another tenant's, or its result expired)",
        reason="job_not_found",
    )


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


class _Lost(Exception):
    """This run is no longer the job's current one (another gateway reran it)."""


class JobRunner:
    """The consumer in each gateway: claims stale runs, reads new jobs, runs each through the core."""

    def __init__(self, cfg: GatewayConfig, core: Dispatcher, queue: JobQueue, name: str):
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
                job_key = _s(fields.get(b"job"))
                task = loop.create_task(self._run(_s(entry_id), job_key))
                self._running[task] = (_s(entry_id), job_key)
                self.metrics.jobs_running.set(len(self._running))
                task.add_done_callback(self._finished)

    async def _autoclaim(self, cursor: str, count: int):
        out = await self.q.run(
            "job claim",
            lambda: self.q.redis.xautoclaim(
                self.q.queue, GROUP, self.consumer, min_idle_time=self.jcfg.claim_idle_ms, start_id=cursor, count=count
            ),
        )
        nxt, claimed = _s(out[0]), [(i, f) for i, f in out[1] if f]  # deleted entries come back empty
        return nxt, claimed

    def _finished(self, task: asyncio.Task) -> None:
        self._running.pop(task, None)
        self.metrics.jobs_running.set(len(self._running))
        self._room.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("job run failed", exc_info=task.exception())

    async def _run(self, entry_id: str, job_key: str) -> None:
        q, now_ms = self.q, int(time.time() * 1000)
        token = uuid.uuid4().hex
        events_key = job_key + ":ev"
        try:
            out = await q.script(
                "start",
                [job_key, events_key, q.queue],
                [
                    self.consumer,
                    token,
                    now_ms,
                    self.jcfg.max_attempts,
                    int(QUEUED_TTL_S * 1000),
                    entry_id,
                    int(self.jcfg.result_ttl_s * 1000),
                    q.events_max,
                ],
            )
        except StateUnavailable as err:
            log.warning("job %s not started (claimed again later): %s", entry_id, err)
            return
        if int(out[0]) == 0:
            return
        if int(out[0]) == -1:
            self.metrics.jobs.labels("failed").inc()
            log.warning("job %s failed: out of runs (%d)", job_key, int(out[1]))
            return
        run, tenant, key_id, data = int(out[1]), _s(out[2]), _s(out[3]), out[4]
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
                    "requeue", [job_key, events_key], [token, 14, "the gateway running it stopped", q.events_max]
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
        request = gpb.ExecuteRequest.FromString(data)

        def parse() -> validation.ValidRequest:
            valid = validation.validate(request, self.cfg.limits)
            valid.priority = BATCH
            return valid

        deadline = asyncio.get_running_loop().time() + self.jcfg.run_timeout_s
        text: list[str] = []
        model, done = "", None
        async with contextlib.aclosing(self.core.execute((), parse, deadline, "job", principal=principal)) as stream:
            async for ev in stream:
                if isinstance(ev, Delta):
                    text.append(ev.text)
                    events.add(ev.text, ev.tokens)
                elif isinstance(ev, Started):
                    model = ev.model
                elif isinstance(ev, Done):
                    done = ev
        return {
            "text": "".join(text),
            "model": model,
            "finish_reason": done.finish_reason,
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "queue_ms": done.queue_ms,
            "ttft_ms": done.ttft_ms,
            "total_ms": done.total_ms,
            "cost_micros": done.cost_micros,
            "cache_hit": done.cache_hit,
        }

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
