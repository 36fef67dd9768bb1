"""The one YAML configuration file: schema, defaults and loading.

Gateway, worker and the Envoy renderer all read the same file; each takes its
own section. Every key has a default, so an empty file is a valid config (the
embedded default). Unknown keys and bad values fail at start with a message
naming the key, e.g. ``config error: gateway.limits.max_task_chars: Input
should be greater than 0``.

``docs/configuration.md`` documents each key; it is generated from the schema
(``python -m igw_common.config``, ``make docs``) and a test checks it is current.
The schema of each component lives beside the others here (``gateway``,
``worker``, ``envoy``), so every process reads the same file the same way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from igw_common.config.base import ConfigError, Section, TracingConfig
from igw_common.config.envoy import EdgeRateLimit, EnvoyConfig, FailoverConfig, TlsConfig
from igw_common.config.gateway import (
    NO_LIMITS,
    AuthConfig,
    CacheConfig,
    GatewayConfig,
    JobsConfig,
    Limits,
    ModelPrice,
    OverflowConfig,
    PlacementConfig,
    PoolConfig,
    PricingConfig,
    QueueConfig,
    QuotaConfig,
    QuotaLimits,
    SessionsConfig,
    WorkerEndpoint,
)
from igw_common.config.worker import SyntheticConfig, VllmConfig, WorkerConfig

__all__ = [
    "AuthConfig",
    "CacheConfig",
    "Config",
    "ConfigError",
    "EdgeRateLimit",
    "EnvoyConfig",
    "FailoverConfig",
    "GatewayConfig",
    "JobsConfig",
    "Limits",
    "NO_LIMITS",
    "ModelPrice",
    "OverflowConfig",
    "PoolConfig",
    "PricingConfig",
    "PlacementConfig",
    "QueueConfig",
    "QuotaConfig",
    "QuotaLimits",
    "SessionsConfig",
    "SyntheticConfig",
    "TlsConfig",
    "TracingConfig",
    "VllmConfig",
    "WorkerConfig",
    "WorkerEndpoint",
    "load",
    "load_or_exit",
    "parse",
    "reference_markdown",
    "with_overrides",
]


class Config(Section):
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    envoy: EnvoyConfig = Field(default_factory=EnvoyConfig)

    @model_validator(mode="after")
    def _consistent(self):
        """Limits that meet across components: a mismatch here cuts every stream of a connection later."""
        g, w, e = self.gateway, self.worker, self.envoy
        if w.min_ping_interval_ms > g.worker_keepalive_ms:
            raise ValueError(
                f"worker.min_ping_interval_ms ({w.min_ping_interval_ms}) must not exceed "
                f"gateway.worker_keepalive_ms ({g.worker_keepalive_ms}): the worker would close "
                "gateway sessions for pinging too often"
            )
        if g.min_ping_interval_ms > e.upstream_keepalive_ms:
            raise ValueError(
                f"gateway.min_ping_interval_ms ({g.min_ping_interval_ms}) must not exceed "
                f"envoy.upstream_keepalive_ms ({e.upstream_keepalive_ms}): the gateway would close "
                "Envoy's connections for pinging too often"
            )
        quotas_apply = (
            g.auth.mode != "none"
            or g.auth.key_file
            or g.quota.default_key_limits != NO_LIMITS
            or g.quota.default_tenant_limits != NO_LIMITS
        )
        if g.processes > 1 and g.quota.store == "local" and quotas_apply:
            raise ValueError(
                f"gateway.processes is {g.processes} but gateway.quota.store is local: each process would keep its "
                "own quotas; use gateway.quota.store: redis so the processes share them exactly"
            )
        if g.processes > 1 and g.sessions.enabled and g.sessions.store == "memory":
            raise ValueError(
                f"gateway.processes is {g.processes} but gateway.sessions.store is memory: a conversation's next "
                "turn may reach another process, which does not know it; use gateway.sessions.store: redis"
            )
        need = g.limits.max_request_bytes + g.limits.max_context_bytes + 65_536
        if w.max_message_bytes < need:
            raise ValueError(
                f"worker.max_message_bytes ({w.max_message_bytes}) must be at least {need}: the "
                "largest request the gateway admits (gateway.limits.max_request_bytes) plus its "
                "context re-encoded as JSON (gateway.limits.max_context_bytes) and framing"
            )
        return self


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = (
            "unknown key (check spelling; see docs/configuration.md)"
            if e["type"] == "extra_forbidden"
            else e["msg"].removeprefix("Value error, ")
        )
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
    """(key, default, description) for every leaf key, for docs/configuration.md."""
    rows = []
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(reference_rows(ann, key + "."))
            continue
        item = next(iter(getattr(ann, "__args__", ())), None)
        if isinstance(item, type) and issubclass(item, BaseModel):
            default = f.get_default(call_default_factory=True)
            if default is None:  # an optional section (`X | None`)
                rows.append((key, "null", f.description or ""))
                rows.extend(reference_rows(item, key + "."))
                continue
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


_PAGE_HEAD = """# Configuration reference

<!-- Generated by `python -m igw_common.config` (`make docs`) from the schema in igw_common/config/; a test
     checks this file is current. Edit the schema's descriptions, not this file. -->

One YAML file (`--config`) configures the gateway, the worker and Envoy; each
reads its own section. Every key has a default, so an empty file is the
embedded default; [`config/default.yaml`](../config/default.yaml) spells out
the common ones. An unknown key or a bad value stops the process at start with
a message naming the key, for example
`config error in c.yaml: gateway.limits.max_task_chars: Input should be greater than 0`.
Keys that meet across components are checked together at load: the keepalive
intervals (`gateway.worker_keepalive_ms` >= `worker.min_ping_interval_ms`,
`envoy.upstream_keepalive_ms` >= `gateway.min_ping_interval_ms`) and the size
budget (`worker.max_message_bytes` >= `gateway.limits.max_request_bytes` +
`gateway.limits.max_context_bytes` + 64 KiB).

"""


def reference_page() -> str:
    return _PAGE_HEAD + reference_markdown() + "\n"
