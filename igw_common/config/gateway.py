"""The ``gateway`` section: the gateway process (listen, workers, limits, auth, quota, queue, ...)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from igw_common.config.base import Section, TracingConfig, check_hostport


class WorkerEndpoint(Section):
    address: str = Field(description="host:port of the worker's gRPC server")
    protocol: Literal["igw", "vllm-grpc"] = Field(
        "igw",
        description='"igw" (our worker, inference.v1) or "vllm-grpc" (a stock vLLM gRPC server, vllm_engine.proto; '
        "the gateway tokenizes and detokenizes)",
    )
    tokenizer: str = Field(
        "",
        description="vllm-grpc: the model folder (tokenizer.json, chat template) on the gateway host; empty = the "
        "path the server reports if present here, else the server's own tokenizer bundle",
    )
    max_concurrent_requests: int = Field(
        0, ge=0, description="vllm-grpc: requests sent at once; 0 = the server's scheduler window (max_num_seqs)"
    )

    _addr = field_validator("address")(lambda cls, v: check_hostport(v))


class Limits(Section):
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
        1_048_576, gt=0, description="largest prompt: UTF-8 bytes of task, messages and context together"
    )
    max_context_depth: int = Field(16, gt=0, le=30, description="deepest nesting of `context` (objects and lists)")
    max_request_bytes: int = Field(
        4_194_304,
        ge=65_536,
        description="largest request message the gateway receives (gRPC receive limit); "
        "larger ones get RESOURCE_EXHAUSTED before any work",
    )


class QuotaLimits(Section):
    """Per-minute budgets; 0 = unlimited."""

    # At most 2**32-1: GetQuota reports limits as uint32.
    requests_per_minute: int = Field(
        0, ge=0, le=2**32 - 1, description="requests admitted per minute (token bucket, bursts up to this)"
    )
    tokens_per_minute: int = Field(
        0, ge=0, le=2**32 - 1, description="prompt + completion tokens per minute, reserved at admission"
    )
    concurrent_streams: int = Field(0, ge=0, le=2**32 - 1, description="streams open at once")


class AuthConfig(Section):
    mode: Literal["none", "api_key", "jwt"] = Field(
        "none",
        description='"none" (everyone is `anonymous_tenant`), "api_key" (keys from key_file) or "jwt" (claims verified by Envoy)',
    )
    key_file: str = Field(
        "", description="YAML key file written by igw-keys (hashes, tenants, limits); required for api_key"
    )
    reload_interval_s: float = Field(
        2.0, gt=0, description="how often the key file's modification time is checked (SIGHUP reloads at once)"
    )
    anonymous_tenant: str = Field("anonymous", min_length=1, description="tenant of every caller in mode none")
    tenant_claim: str = Field(
        "sub",
        min_length=1,
        description="JWT claim that names the tenant (mode jwt); its value must be letters, digits and . _ : @ - only",
    )
    tenant_claim_max_chars: int = Field(
        128, ge=1, le=1_024, description="longest tenant name a JWT claim may carry; longer is UNAUTHENTICATED"
    )
    jwt_payload_header: str = Field(
        "x-jwt-payload", description="header in which Envoy forwards the verified JWT payload"
    )
    edge_secret_file: str = Field(
        "",
        description="file holding the secret Envoy adds to every request (at least 16 visible ASCII characters, e.g. `openssl rand -hex 32`; read by Envoy and the gateway, keep it mode 0600); required for jwt",
    )
    jwt_issuer: str = Field("", description="required `iss` of JWTs (Envoy checks it)")
    jwt_audiences: list[str] = Field(
        default_factory=list,
        description="accepted `aud` values (Envoy checks them); required for jwt, so a token issued for another service is refused",
    )
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


class QuotaConfig(Section):
    store: Literal["local", "redis"] = Field(
        "local", description='"local" (this process) or "redis" (shared by all replicas)'
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for store redis")
    redis_key_prefix: str = Field("igw:q:", description="prefix of every Redis key")
    redis_timeout_ms: int = Field(
        250, gt=0, description="a Redis call slower than this (connecting included) counts as a failure"
    )
    redis_failure_mode: Literal["open", "closed"] = Field(
        "open",
        description='Redis unreachable or refusing (read-only replica, out of memory, ...): "open" = fall back to this gateway\'s local limits, "closed" = refuse with UNAVAILABLE',
    )
    lease_ttl_s: float = Field(
        300.0,
        gt=0,
        description="concurrent-stream leases are renewed every lease_ttl_s/3 while their stream runs; "
        "one no longer renewed (its gateway died) expires after this",
    )
    redis_retry_queue: int = Field(
        10_000,
        gt=0,
        description="refunds, settles and undos of Redis reservations waiting for Redis to answer; "
        "when full the oldest is dropped (its lease expires within lease_ttl_s)",
    )
    redis_retry_backoff_max_ms: int = Field(
        5_000,
        gt=0,
        description="longest wait between retries of those (the first waits redis_timeout_ms, then it doubles)",
    )
    default_key_limits: QuotaLimits = Field(default_factory=QuotaLimits, description="limits of keys that set none")
    default_tenant_limits: QuotaLimits = Field(
        default_factory=QuotaLimits, description="limits of a tenant the key file does not list (e.g. JWT callers)"
    )


class PoolConfig(Section):
    name: str = Field(
        min_length=1, description="pool name, e.g. stable / canary or blue / green (metrics label `pool`)"
    )
    weight: int = Field(100, ge=0, description="share of traffic relative to the other pools; reloaded on SIGHUP")
    workers: list[WorkerEndpoint] = Field(default_factory=list, description="static workers of the pool")
    worker_dns: list[str] = Field(default_factory=list, description="host:port names re-resolved periodically")


class QueueConfig(Section):
    max_queued: int = Field(
        256, ge=0, description="requests that may wait for a worker; more are refused at once (RESOURCE_EXHAUSTED)"
    )
    drr_quantum_tokens: int = Field(
        1_024, gt=0, description="deficit round robin: tokens of credit a tenant gets per round"
    )
    retry_before_first_token: int = Field(
        2, ge=0, description="times a request whose worker failed before its first token is retried on another worker"
    )
    max_in_flight_per_worker: int = Field(
        0, ge=0, description="cap on this gateway's requests in flight per worker; 0 = the worker's reported capacity"
    )
    affinity_entries: int = Field(
        100_000, gt=0, description="session/prefix -> worker entries remembered for affinity (LRU)"
    )
    max_bypass_ms: int = Field(
        2_000,
        ge=0,
        description="a request that cannot be placed lets later requests of its class pass it for this "
        "long; then it holds the workers it could use until one has room (no starvation)",
    )


class GatewayConfig(Section):
    listen: str = Field("127.0.0.1:50051", description="gRPC listen address of the gateway")
    http_listen: str = Field(
        "127.0.0.1:50052",
        description='OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models); "" = off',
    )
    name: str = Field("", description="replica name for logs; empty = the listen address")
    default_model: str = Field("", description="model used when a request names none; empty = the first worker's model")
    workers: list[WorkerEndpoint] = Field(
        default_factory=lambda: [WorkerEndpoint(address="127.0.0.1:50061")],
        description="static list of workers",
    )
    worker_connect_timeout_ms: int = Field(2_000, gt=0, description="time to reach a worker before it counts as down")
    worker_reconnect_backoff_ms: int = Field(
        500,
        gt=0,
        description="first wait before reconnecting a lost worker (doubles, capped at 10 s; back to this after a session was up)",
    )
    worker_keepalive_ms: int = Field(
        20_000,
        ge=1_000,
        description="gRPC keepalive ping interval to workers (also on quiet sessions); a worker "
        "must permit it (worker.min_ping_interval_ms <= this)",
    )
    min_ping_interval_ms: int = Field(
        10_000,
        ge=0,
        description="keepalive pings Envoy and clients may send this often, also without data "
        "(<= envoy.upstream_keepalive_ms, or the gateway closes the connection with too_many_pings)",
    )
    drain_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, time in-flight streams get to finish")
    metrics_listen: str = Field("127.0.0.1:9464", description='Prometheus /metrics endpoint (host:port); "" = off')
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="log level (JSON lines on stderr)"
    )
    event_loop: Literal["uvloop", "asyncio"] = Field("uvloop", description="event loop of the gateway process")
    log_prompts: bool = Field(
        False, description="put the task text in the per-request log line (debugging only: it may hold secrets)"
    )
    drain_notice_s: float = Field(
        2.0,
        ge=0,
        description="on SIGTERM, time NOT_SERVING is announced while new calls are still accepted (> Envoy's health check interval)",
    )
    worker_dns: list[str] = Field(
        default_factory=list,
        description="host:port names re-resolved periodically (e.g. a Kubernetes headless Service); every address is a worker",
    )
    pools: list[PoolConfig] = Field(
        default_factory=list,
        description="weighted worker pools (canary, blue-green); empty = one pool of `workers`/`worker_dns`",
    )
    pool_affinity: Literal["tenant", "session"] = Field(
        "session",
        description="what keeps a user on one pool: the tenant, or the session id (the tenant when a request has none)",
    )
    worker_dns_refresh_s: float = Field(10.0, gt=0, description="how often worker_dns names are re-resolved")
    limits: Limits = Field(default_factory=Limits)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    quota: QuotaConfig = Field(default_factory=QuotaConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)

    _addr = field_validator("listen")(lambda cls, v: check_hostport(v))
    _http = field_validator("http_listen")(lambda cls, v: check_hostport(v) if v else v)
