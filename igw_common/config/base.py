"""What every section of the config shares: strict models, address checks, tracing settings."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ConfigError(Exception):
    """Raised for a config file that cannot be used; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_hostport(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {value!r}")
    return value


class TracingConfig(Section):
    enabled: bool = Field(False, description="export OpenTelemetry spans")
    exporter: Literal["otlp", "console"] = Field(
        "otlp", description='"otlp" (gRPC) or "console" (stdout, for debugging)'
    )
    otlp_endpoint: str = Field("http://127.0.0.1:4317", description="OTLP/gRPC collector endpoint")
