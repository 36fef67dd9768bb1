"""Durable background jobs: the queue in Redis (this package), SubmitJob/GetJob/WatchJob
(``gateway.doors.jobs``) and the runner in every gateway (``gateway.doors.job_runner``).

The queue is a Redis Stream with one consumer group; a job survives the gateway that accepted or ran
it, and needs Redis to (with persistence, ``appendonly yes``, to survive a Redis restart too).

- **Submit** authenticates and validates the request as Execute would, then one script writes the
  job's hash and appends its entry to the stream (both or neither), so the client holds a job id that
  will run. A client-chosen ``job_id`` is an idempotency key: the same id again returns the existing
  job (ALREADY_EXISTS if the request differs).
- **Run**: each gateway runs up to ``concurrency`` jobs, read with ``XREADGROUP``; a job runs through
  the request core (``RequestCore.run``) at batch priority as the principal that submitted it, so
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

from gateway.state.jobs.queue import BLOCK_MS, GROUP, QUEUED_TTL_S, JobQueue, request_hash, text

__all__ = ["BLOCK_MS", "GROUP", "QUEUED_TTL_S", "JobQueue", "request_hash", "text"]
