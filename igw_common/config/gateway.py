"""The ``gateway`` section: the gateway process (listen, workers, limits, auth, quota, queue, ...)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from igw_common.config.base import Section, TracingConfig, check_hostport


class WorkerEndpoint(Section):
    protocol: Literal["igw", "vllm-grpc", "openai-http"] = Field(
        "igw",
        description='"igw" (our worker, inference.v1), "vllm-grpc" (a stock vLLM gRPC server, vllm_engine.proto; '
        'the gateway tokenizes and detokenizes) or "openai-http" (any server of the OpenAI chat and completions '
        "API with SSE streaming: vllm serve, SGLang, llama.cpp, Ollama, a cloud provider)",
    )
    address: str = Field(
        description="host:port of the worker's gRPC server; for openai-http the server's base URL, "
        "http(s)://host[:port][/path], where /v1/chat/completions lives (e.g. http://10.0.0.5:8000/v1)"
    )
    tokenizer: str = Field(
        "",
        description="the model folder (tokenizer.json, chat template) on the gateway host; empty = the path the "
        "worker reports if present here, else (vllm-grpc) the server's own tokenizer bundle. vllm-grpc members "
        "need it to serve; our workers only for placement by cached prefix (gateway.placement); openai-http "
        "members to count a prompt's tokens before a server that does not report them mid-stream answers",
    )
    kv_events_endpoint: str = Field(
        "",
        description="vllm-grpc: the server's KV-event publisher (vLLM's --kv-events-config endpoint, e.g. "
        "tcp://host:5557; topic kv_events_topic), read for placement by cached prefix; empty = none (our "
        "workers report theirs on their own stream)",
    )
    kv_events_topic: str = Field("", description="vllm-grpc: the topic of kv_events_endpoint (vLLM's default: empty)")
    max_concurrent_requests: int = Field(
        0,
        ge=0,
        description="vllm-grpc: requests sent at once; 0 = the server's scheduler window (max_num_seqs). "
        "openai-http: streams open at once (the member's connection pool holds no more); 0 = 64",
    )
    model: str = Field(
        "",
        description="openai-http: the model name clients use for this member; empty = served_model. Lets a cloud "
        "member of an overflow pool stand in for an on-prem model",
    )
    served_model: str = Field(
        "", description="openai-http: the model name sent to the server; empty = the first id of its GET /models"
    )
    max_context_tokens: int = Field(
        0,
        ge=0,
        description="openai-http: the model's context window; 0 = the server's own (vLLM's max_model_len in "
        "GET /models), else 8,192",
    )
    api_key_file: str = Field(
        "", description="openai-http: a file holding the bearer token sent to the server (never logged)"
    )
    api_key_env: str = Field(
        "", description="openai-http: an environment variable holding that token (used when api_key_file is empty)"
    )
    stall_timeout_ms: int = Field(
        60_000,
        gt=0,
        description="openai-http: longest wait for the server's next streamed chunk (and its first); a member "
        "silent longer ends the request with UNAVAILABLE (retried elsewhere if nothing was sent yet)",
    )

    @field_validator("address")
    @classmethod
    def _address_for_protocol(cls, v, info):
        return check_base_url(v) if info.data.get("protocol") == "openai-http" else check_hostport(v)

    @model_validator(mode="after")
    def _http_only_keys(self):
        if self.protocol != "openai-http":
            for name in ("model", "served_model", "api_key_file", "api_key_env"):
                if getattr(self, name):
                    raise ValueError(f"{name} is for openai-http members only")
        if self.api_key_file and self.api_key_env:
            raise ValueError("set api_key_file or api_key_env, not both")
        return self


def check_base_url(value: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.username or parts.password:
        raise ValueError("the URL must not hold credentials (they would reach logs): use api_key_file or api_key_env")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"expected a base URL http(s)://host[:port][/path], got {value!r}")
    return value


class Limits(Section):
    """Request validation limits; a request over any of them gets INVALID_ARGUMENT."""

    max_task_chars: int = Field(32_768, gt=0, description="longest `task`, in characters")
    max_context_bytes: int = Field(65_536, gt=0, description="largest `context`, as compact JSON bytes")
    max_messages: int = Field(
        1_024, ge=0, description="most chat `messages` in one request (an agent's tool loop adds two per call)"
    )
    max_message_chars: int = Field(
        131_072, gt=0, description="longest content of one chat message (a tool's result: a file, a test log)"
    )
    max_stop_sequences: int = Field(8, ge=0, description="most `sampling.stop` strings")
    max_stop_chars: int = Field(64, gt=0, description="longest single stop string")
    default_max_tokens: int = Field(256, gt=0, description="`sampling.max_tokens` when the request leaves it unset")
    max_tokens_limit: int = Field(4_096, gt=0, description="largest `sampling.max_tokens` accepted")
    max_prompt_bytes: int = Field(
        1_048_576, gt=0, description="largest prompt: UTF-8 bytes of task, messages and context together"
    )
    max_context_depth: int = Field(16, gt=0, le=30, description="deepest nesting of `context` (objects and lists)")
    max_schema_bytes: int = Field(
        65_536, gt=0, description="largest structured-output JSON schema (`constraint.json_schema`), as compact JSON"
    )
    max_schema_depth: int = Field(
        32, gt=0, le=64, description="deepest nesting of a structured-output JSON schema (objects and lists)"
    )
    max_regex_chars: int = Field(4_096, gt=0, description="longest structured-output regular expression")
    max_choices: int = Field(256, gt=0, description="most strings in a structured-output choice list")
    max_choice_chars: int = Field(1_024, gt=0, description="longest string of a structured-output choice list")
    max_tools: int = Field(128, ge=0, description="most `tools` in one request (OpenAI's limit too)")
    max_tools_bytes: int = Field(
        262_144,
        gt=0,
        description="largest `tools` in all: names, descriptions and parameter schemas (each schema also within "
        "max_schema_bytes and max_schema_depth), as UTF-8 bytes",
    )
    max_tool_calls_per_message: int = Field(
        64, gt=0, description="most `tool_calls` of one assistant message in the history"
    )
    max_tool_arguments_bytes: int = Field(
        65_536, gt=0, description="largest arguments (JSON text) of one tool call in the history"
    )
    max_request_bytes: int = Field(
        4_194_304,
        ge=65_536,
        description="largest request message the gateway receives (gRPC receive limit); "
        "larger ones get RESOURCE_EXHAUSTED before any work",
    )


class QuotaLimits(Section):
    """Per-minute budgets and spend budgets per day and month; 0 = unlimited."""

    # At most 2**32-1: GetQuota reports limits as uint32.
    requests_per_minute: int = Field(
        0, ge=0, le=2**32 - 1, description="requests admitted per minute (token bucket, bursts up to this)"
    )
    tokens_per_minute: int = Field(
        0, ge=0, le=2**32 - 1, description="prompt + completion tokens per minute, reserved at admission"
    )
    concurrent_streams: int = Field(0, ge=0, le=2**32 - 1, description="streams open at once")
    # Currency units (e.g. 25.0 = 25 USD): what operators write; kept as integer micro-units inside.
    spend_per_day: float = Field(
        0.0,
        ge=0,
        le=1e7,  # micro-units stay below 1e14: exact through Redis Lua (numbers print with 14 digits)
        description="spend budget per UTC day, in units of gateway.pricing.currency (e.g. 25.0); "
        "each request reserves the cost of prompt + max_tokens at admission, settled to its real cost",
    )
    spend_per_month: float = Field(
        0.0, ge=0, le=1e7, description="spend budget per UTC calendar month, in units of gateway.pricing.currency"
    )


NO_LIMITS = QuotaLimits()  # "unlimited", shared (sections are frozen): built once, not per request


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


class ModelPrice(Section):
    model: str = Field(min_length=1, description="model name as ListModels shows it")
    input_per_million: float = Field(
        0.0, ge=0, le=1e6, description="price of 1M prompt tokens, in units of gateway.pricing.currency"
    )
    output_per_million: float = Field(
        0.0, ge=0, le=1e6, description="price of 1M generated tokens, in units of gateway.pricing.currency"
    )


class PricingConfig(Section):
    """What requests cost: ``Done.cost_micros``, the log line, ``igw_cost_total`` and spend budgets."""

    currency: str = Field("USD", min_length=1, max_length=16, description="currency of every price and budget")
    models: list[ModelPrice] = Field(
        default_factory=list, description="price per model; a model not listed costs `default`"
    )
    default: ModelPrice = Field(
        default_factory=lambda: ModelPrice(model="*"),
        description="price of models `models` does not list (0 = free: spend budgets never bind for them)",
    )

    @field_validator("models")
    @classmethod
    def _unique(cls, v):
        names = [m.model for m in v]
        if len(names) != len(set(names)):
            raise ValueError("a model is priced twice")
        return v


class CacheConfig(Section):
    """Exact-match cache of deterministic answers (temperature 0, or a fixed seed)."""

    enabled: bool = Field(False, description="answer repeated deterministic requests from the cache")
    store: Literal["memory", "redis"] = Field(
        "memory", description='"memory" (this process) or "redis" (shared by all replicas)'
    )
    redis_url: str = Field(
        "",
        description="Redis for store redis; empty = gateway.quota.redis_url (then gateway.quota.store must be redis)",
    )
    redis_key_prefix: str = Field("igw:c:", description="prefix of every cache key in Redis")
    ttl_s: float = Field(3_600.0, gt=0, description="how long an answer stays cached")
    max_entry_bytes: int = Field(
        262_144, gt=0, description="answers larger than this (stored form: text and deltas) are not cached"
    )
    memory_max_bytes: int = Field(
        67_108_864, gt=0, description="store memory: total size of cached answers; the least recently used go first"
    )
    hit_charge: Literal["request", "full"] = Field(
        "request",
        description='what a hit costs against quotas and spend budgets: "request" = one request and a stream '
        'slot, no tokens, no cost (no worker ran); "full" = the same as the miss it replays',
    )
    single_flight: bool = Field(
        True,
        description="identical misses arriving together: one generates, the others wait for its answer "
        "(at most single_flight_wait_ms) and are served as hits",
    )
    single_flight_wait_ms: int = Field(
        30_000, gt=0, description="longest wait for another request's identical answer before generating anyway"
    )
    redis_timeout_ms: int = Field(
        250, gt=0, description="a cache call to Redis slower than this counts as a miss (the request is generated)"
    )


class SessionsConfig(Section):
    """Server-side conversations: with a session_id, the gateway keeps the history; a client sends its new turn."""

    enabled: bool = Field(
        False,
        description="store the conversation of requests that carry a session_id (chat requests only); "
        "off = session_id only gives worker affinity",
    )
    store: Literal["memory", "redis"] = Field(
        "memory", description='"memory" (this process) or "redis" (shared by all replicas)'
    )
    redis_url: str = Field(
        "",
        description="Redis for store redis; empty = gateway.quota.redis_url (then gateway.quota.store must be redis)",
    )
    redis_key_prefix: str = Field("igw:s:", description="prefix of every session key in Redis")
    ttl_s: float = Field(86_400.0, gt=0, description="a session untouched this long is forgotten")
    max_turns: int = Field(
        256, gt=0, description="turns a session keeps at most; older ones are dropped first (reported)"
    )
    max_session_bytes: int = Field(
        1_048_576,
        gt=0,
        description="text a session keeps at most (history sent to the worker is also bounded by "
        "gateway.limits.max_prompt_bytes); older turns are dropped first",
    )
    context_margin_tokens: int = Field(
        64,
        ge=0,
        description="tokens kept free beside history + new turn + max_tokens for the chat template, since the "
        "new turn's tokens are estimated before the worker counts them",
    )
    memory_max_sessions: int = Field(
        100_000, gt=0, description="store memory: sessions kept at most; the least recently used go first"
    )
    redis_timeout_ms: int = Field(
        1_000, gt=0, description="a session read or write slower than this fails the turn with UNAVAILABLE"
    )


class JobsConfig(Section):
    """Durable background jobs (SubmitJob/GetJob/WatchJob) on a Redis Stream with a consumer group."""

    enabled: bool = Field(
        False, description="serve SubmitJob/GetJob/WatchJob and run jobs here; needs Redis (jobs outlive a gateway)"
    )
    redis_url: str = Field(
        "",
        description="Redis of the job queue; empty = gateway.quota.redis_url (then gateway.quota.store must be redis)",
    )
    redis_key_prefix: str = Field("igw:j:", description="prefix of every job key in Redis (one hash slot)")
    concurrency: int = Field(4, gt=0, description="jobs this gateway runs at once")
    claim_idle_ms: int = Field(
        30_000,
        ge=1_000,
        description="a running job whose gateway sent no heartbeat for this long (it died) is claimed by "
        "another gateway and rerun from the start; heartbeats go every claim_idle_ms/3",
    )
    result_ttl_s: float = Field(86_400.0, gt=0, description="how long a finished job's result can be read")
    max_queued: int = Field(
        100_000, gt=0, description="jobs waiting or running in all; more are refused with RESOURCE_EXHAUSTED"
    )
    max_attempts: int = Field(
        3,
        gt=0,
        description="runs a job gets (reruns after a gateway died, retries after a transient refusal such as a "
        "quota); then it fails with the last error",
    )
    run_timeout_s: float = Field(900.0, gt=0, description="deadline of one run, queueing for a worker included")
    watch_flush_ms: int = Field(
        50, gt=0, description="a running job's deltas are written for WatchJob at most this often, merged"
    )
    redis_timeout_ms: int = Field(2_000, gt=0, description="a job call to Redis slower than this fails")


class PoolConfig(Section):
    name: str = Field(
        min_length=1, description="pool name, e.g. stable / canary or blue / green (metrics label `pool`)"
    )
    weight: int = Field(100, ge=0, description="share of traffic relative to the other pools; reloaded on SIGHUP")
    workers: list[WorkerEndpoint] = Field(default_factory=list, description="static workers of the pool")
    worker_dns: list[str] = Field(default_factory=list, description="host:port names re-resolved periodically")
    overflow: bool = Field(
        False,
        description="an overflow pool (e.g. a cloud provider's endpoint): out of the weighted choice; a request goes "
        "there only when the other pools cannot take it within gateway.overflow.after_queue_ms (or none of their "
        "workers is up), and never for on-prem-only tenants or models (gateway.overflow)",
    )
    price: ModelPrice | None = Field(
        None,
        description="what tokens served by this pool cost (its `model` is ignored); none = gateway.pricing. "
        "Budgets count it",
    )


class OverflowConfig(Section):
    """Who may burst to overflow pools (``gateway.pools[].overflow``), and when."""

    after_queue_ms: int = Field(
        2_000,
        ge=0,
        description="how long a request waits in the queue for the other pools before an overflow pool may take it",
    )
    tenants: list[str] = Field(
        default_factory=lambda: ["*"], description='tenants that may burst ("*" = every tenant not on-prem only)'
    )
    on_prem_only_tenants: list[str] = Field(
        default_factory=list, description="tenants whose requests never leave the non-overflow pools"
    )
    on_prem_only_models: list[str] = Field(
        default_factory=list, description="models whose requests never leave the non-overflow pools"
    )

    def allows(self, tenant: str, model: str) -> bool:
        if tenant in self.on_prem_only_tenants or model in self.on_prem_only_models:
            return False
        return "*" in self.tenants or tenant in self.tenants


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
    resume_after_first_token: int = Field(
        2,
        ge=0,
        description="times a streaming request whose worker was lost mid-answer is continued on another worker "
        "from the tokens already sent (the client sees a pause); 0 = such a request ends with UNAVAILABLE. "
        "Not for requests with tools or a structured-output constraint",
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


class PlacementConfig(Section):
    """Which worker gets a request; docs/design.md ("Placement") explains the choice and the weights."""

    strategy: Literal["kv_cache", "affinity", "least_loaded"] = Field(
        "kv_cache",
        description="kv_cache: the worker with the least cost, prefill of the prompt's uncached tokens against "
        "load, where every candidate reports its prefix cache (else affinity); affinity: the worker that last "
        "served the session or prompt prefix, else the least loaded; least_loaded: by outstanding tokens only",
    )
    kv_prefill_weight: float = Field(
        1.0,
        ge=0,
        description="kv_cache: cost of one prompt token the worker must compute: this prompt's past its cached "
        "prefix, and those of its requests still before their first token",
    )
    kv_load_weight: float = Field(
        0.1,
        ge=0,
        description="kv_cache: cost of one token held by the worker's running requests (their prompts and output "
        "so far, not max_tokens)",
    )
    kv_max_blocks_per_worker: int = Field(
        1_000_000, gt=0, description="kv_cache: cached blocks remembered per worker (oldest forgotten first)"
    )


def replica_addresses(listen: str, count: int) -> list[str]:
    """host:port of each of ``count`` processes: ``listen``'s port, then the next ones."""
    if not listen:
        return [""] * count
    host, _, port = listen.rpartition(":")
    return [f"{host}:{int(port) + i}" for i in range(count)]


class NativeRelayConfig(Section):
    """The native relay (native/relay, built by `make native`): a C++ process this gateway starts that carries
    Execute calls' messages (the per-token writes to clients, the workers' streams) while this process keeps
    every decision (docs/design.md, "The native relay")."""

    enabled: bool = Field(
        False,
        description="start the relay beside this gateway process; Envoy then routes gateway.v1.Gateway/Execute to it "
        "(every other RPC and the HTTP APIs stay on the gateway). About half the gateway's CPU per token and per "
        "request (docs/performance.md). Requests placed on our workers (protocol igw) have the relay carry their "
        "tokens; vllm-grpc and openai-http members work through it too, with the gateway writing their tokens",
    )
    listen: str = Field(
        "127.0.0.1:50081",
        description="where the relay takes Execute calls (process i of gateway.processes: this port + i); Envoy's "
        "upstream for Execute",
    )
    binary: str = Field(
        "", description="the relay executable; empty = native/relay/build/native_relay of this source tree"
    )
    report_interval_ms: int = Field(
        100,
        ge=1,
        le=10_000,
        description="how often the relay tells the gateway what a long stream has sent (otherwise: its first "
        "delta and, at its end, the rest). A request cut short (cancelled, superseded, past its deadline) is "
        "charged, and reports in its trailers, the tokens the gateway had heard of: up to this much of its tail "
        "may go uncounted. Lower: exacter counts, more of the gateway's CPU per token",
    )
    core_timeout_ms: int = Field(
        3_000,
        ge=100,
        description="the relay pings its gateway every quarter of this; a gateway that leaves a ping unanswered "
        "this long (frozen, stopped) is taken for gone: the relay ends its calls UNAVAILABLE and exits, as when "
        "the gateway dies",
    )
    restart_backoff_ms: int = Field(
        500,
        gt=0,
        description="a relay that exits is started again after this (doubling up to 10 s while it keeps failing); "
        "the calls it carried end UNAVAILABLE, new Execute calls go to other replicas (Envoy) meanwhile",
    )

    _addr = field_validator("listen")(lambda cls, v: check_hostport(v))


class GatewayConfig(Section):
    listen: str = Field("127.0.0.1:50051", description="gRPC listen address of the gateway")
    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="gateway processes igw-stack runs on this host behind the same Envoy (one per core); process i "
        "listens on the ports of listen, metrics_listen and http_listen + i; more than 1 needs quota.store redis "
        "when any quota applies, so they share quotas exactly",
    )
    sse_keepalive_ms: int = Field(
        15_000,
        ge=100,
        description="HTTP APIs: a streamed answer silent this long (a long prompt's prefill: minutes on a CPU) gets a "
        "keep-alive event (an SSE comment; Anthropic's ping), so neither Envoy's stream_idle_timeout_s nor a "
        "client's read timeout ends it while the engine works",
    )
    stream_interval_ms: int = Field(
        10,
        ge=0,
        le=1000,
        description="merge engine steps into one delta at most this often (ms; the first token always at once); "
        "0 = a delta per step; a request may ask for its own (stream_interval_ms, x-igw-stream-interval-ms). "
        "Fewer messages per token: about half the gateway's CPU per token at 1 ms engine steps (docs/performance.md)",
    )
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
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    overflow: OverflowConfig = Field(default_factory=OverflowConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    pricing: PricingConfig = Field(default_factory=PricingConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    sessions: SessionsConfig = Field(default_factory=SessionsConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    native_relay: NativeRelayConfig = Field(default_factory=NativeRelayConfig)

    _addr = field_validator("listen")(lambda cls, v: check_hostport(v))
    _http = field_validator("http_listen")(lambda cls, v: check_hostport(v) if v else v)

    @model_validator(mode="after")
    def _redis_for_state(self):
        """Features that keep state in Redis need one configured: their own redis_url, or the quota store's."""
        needs = [("cache", self.cache.store == "redis"), ("sessions", self.sessions.store == "redis")]
        needs.append(("jobs", self.jobs.enabled))
        for name, uses_redis in needs:
            if uses_redis and not getattr(self, name).redis_url and self.quota.store != "redis":
                what = "gateway.jobs.enabled" if name == "jobs" else f"gateway.{name}.store: redis"
                why = " (jobs must outlive a gateway, so they live in Redis)" if name == "jobs" else ""
                raise ValueError(
                    f"{what} needs Redis{why}: set gateway.{name}.redis_url, or gateway.quota.store: redis "
                    "to use gateway.quota.redis_url"
                )
        return self

    def redis_url_for(self, section: str) -> str:
        """The Redis of a stateful feature (cache, sessions, jobs): its own, else the quota store's."""
        return getattr(self, section).redis_url or self.quota.redis_url
