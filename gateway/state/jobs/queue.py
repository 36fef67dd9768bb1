"""The job queue's Redis side: keys, the Lua scripts (``lua/*.lua``) and reading a job back."""

from __future__ import annotations

import hashlib
from importlib import resources

from gateway.state.redis import StateUnavailable, call, client, esc
from igw_common.config import GatewayConfig

GROUP = "igw"
QUEUED_TTL_S = 7 * 86_400  # a job not finished within a week is forgotten (its result could not be read anyway)
BLOCK_MS = 1_000  # longest blocking read: how soon a stopping runner or a watcher notices


def text(v) -> str:
    """A Redis value as text (the clients answer bytes)."""
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
        lua = resources.files("gateway.state.jobs").joinpath("lua")  # package resources: a wheel works too
        self.scripts = {
            name: self.redis.register_script(lua.joinpath(f"{name}.lua").read_text())
            for name in ("submit", "start", "finish", "requeue", "heartbeat")
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
        return {text(k): v for k, v in raw.items()} if raw else None

    async def close(self) -> None:
        await self.redis.aclose()
        await self.blocking.aclose()
