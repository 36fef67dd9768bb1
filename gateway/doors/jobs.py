"""The jobs RPCs: SubmitJob, GetJob, WatchJob (``gateway.doors.grpc_service`` maps them onto gRPC).

The queue lives in ``gateway.state.jobs``; the runner that takes jobs off it is
``gateway.doors.job_runner``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid

import grpc

from gateway.core.events import Done
from gateway.core.request_core import RequestCore
from gateway.core.validation import REQUEST_ID, REQUEST_ID_RULE
from gateway.doors import execute_wire
from gateway.errors import RpcError, clip, invalid_argument, permission_denied, resource_exhausted, unavailable
from gateway.state.jobs import BLOCK_MS, QUEUED_TTL_S, JobQueue, request_hash, text
from gateway.state.redis import StateUnavailable, call
from gateway.v1 import gateway_pb2 as gpb
from igw_common.config import GatewayConfig

log = logging.getLogger("gateway.doors.jobs")

STATES = {
    "queued": gpb.JOB_STATE_QUEUED,
    "running": gpb.JOB_STATE_RUNNING,
    "succeeded": gpb.JOB_STATE_SUCCEEDED,
    "failed": gpb.JOB_STATE_FAILED,
}


class JobService:
    """What the RPCs do; ``gateway.doors.grpc_service`` maps them onto gRPC."""

    def __init__(self, cfg: GatewayConfig, core: RequestCore, queue: JobQueue):
        self.cfg, self.core, self.queue = cfg, core, queue

    def _unavailable(self, err: StateUnavailable) -> RpcError:
        self.core.metrics.state_store_failures.labels("jobs").inc()
        log.warning("job store unavailable: %s", err)
        return unavailable("the job store (Redis) is unreachable; retry shortly", 1.0, reason="job_store")

    @staticmethod
    def _check_id(job_id: str) -> None:
        if not REQUEST_ID.fullmatch(job_id):
            raise invalid_argument("job_id", REQUEST_ID_RULE)

    async def submit(self, headers, req: gpb.SubmitJobRequest) -> gpb.Job:
        principal = self.core.authenticate(headers)
        if req.job_id:
            self._check_id(req.job_id)
        if not req.HasField("request"):
            raise invalid_argument("request", "the request to run is missing")
        if req.request.supersede_key:
            raise invalid_argument("request.supersede_key", "jobs cannot be superseded; leave it empty")
        try:
            valid = self.core.validate(execute_wire.draft(req.request))
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
        return job_to_proto(job_id, h)

    async def get(self, headers, job_id: str) -> gpb.Job:
        principal = self.core.authenticate(headers)
        self._check_id(job_id)
        try:
            h = await self.queue.load(principal.tenant, job_id)
        except StateUnavailable as err:
            raise self._unavailable(err) from None
        if h is None:
            raise _not_found(job_id)
        return job_to_proto(job_id, h)

    async def watch(self, headers, job_id: str):
        """Yields WatchJobResponse messages until the job is finished."""
        principal = self.core.authenticate(headers)
        self._check_id(job_id)
        q = self.queue
        key = q.job_key(principal.tenant, job_id)
        try:
            h = await q.load(principal.tenant, job_id)
            if h is None:
                raise _not_found(job_id)
            job = job_to_proto(job_id, h)
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
                        yield gpb.WatchJobResponse(delta=gpb.Delta(text=text(f.get(b"x")), tokens=int(f.get(b"n", 0))))
                    elif kind == b"q":
                        yield gpb.WatchJobResponse(
                            status=gpb.Job(job_id=job_id, state=gpb.JOB_STATE_QUEUED, attempts=run)
                        )
                    elif kind == b"f":
                        h = await q.load(principal.tenant, job_id)
                        if h is not None:
                            yield gpb.WatchJobResponse(status=job_to_proto(job_id, h))
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
                    if text(h.get("st")) in ("succeeded", "failed"):
                        yield gpb.WatchJobResponse(status=job_to_proto(job_id, h))
                        return
        except StateUnavailable as err:
            raise self._unavailable(err) from None


def _not_found(job_id: str) -> RpcError:
    return RpcError(
        grpc.StatusCode.NOT_FOUND,
        f"job_id: no job {clip(job_id)} for this caller (unknown, another tenant's, or its result expired)",
        reason="job_not_found",
    )


def job_to_proto(job_id: str, h: dict) -> gpb.Job:
    """A job's stored hash as the ``Job`` message."""
    job = gpb.Job(
        job_id=job_id,
        state=STATES.get(text(h.get("st")), gpb.JOB_STATE_UNSPECIFIED),
        attempts=int(h.get("att") or 0),
        created_unix_ms=int(h.get("created") or 0),
        finished_unix_ms=int(h.get("finished") or 0),
    )
    if job.state == gpb.JOB_STATE_SUCCEEDED and h.get("res"):
        r = json.loads(h["res"])
        # A result stored before a field existed leaves it at its default.
        done = execute_wire.done(Done(**{f.name: r[f.name] for f in dataclasses.fields(Done) if f.name in r}))
        job.result.CopyFrom(gpb.JobResult(text=r["text"], model=r["model"], done=done))
    elif job.state == gpb.JOB_STATE_FAILED:
        job.error.CopyFrom(gpb.JobError(code=int(h.get("ecode") or 0), message=text(h.get("emsg"))))
    return job
