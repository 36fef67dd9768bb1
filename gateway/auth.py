"""Who is calling: API keys from the key file, or JWT claims verified by Envoy.

API keys look like ``igw_<key id>_<secret>``. The key file (YAML, written by
``igw-keys``) stores only the SHA-256 of each key with its tenant, allowed
models, limits and priority cap; the key id, a public prefix, finds the entry
and the hash is compared in constant time. A key, its hash or a bearer token
never appears in a log line, metric label or error message: the key id does.

The key file is reloaded without a restart on SIGHUP and when its
modification time changes (polled every ``gateway.auth.reload_interval_s``).
A file that fails to parse keeps the previous keys in force and logs why.

JWT mode trusts claims only from Envoy: Envoy's ``jwt_authn`` filter verifies
the token against a local JWKS file and forwards the payload in
``x-jwt-payload``; Envoy also adds ``x-igw-edge-secret``, a shared secret
from ``gateway.auth.edge_secret_file``, and overwrites any copy a client
sent. A request without the right secret never came through Envoy and is
rejected, whatever claim headers it carries.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.config import AuthConfig, QuotaLimits
from gateway.errors import RpcError

log = logging.getLogger("gateway.auth")

KEY_PREFIX = "igw"
_KEY = re.compile(r"^igw_([a-z0-9]{12})_([A-Za-z0-9_-]{32,})$")
EDGE_SECRET_HEADER = "x-igw-edge-secret"
PRIORITIES = ("batch", "interactive")


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tenant: str = Field(min_length=1)
    models: list[str] = Field(default_factory=list, description="models this key may use; empty = all")
    priority_max: str = Field("interactive", pattern="^(batch|interactive)$")
    limits: QuotaLimits = Field(default_factory=QuotaLimits)
    revoked: bool = False
    created: str = ""
    note: str = ""


class TenantEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limits: QuotaLimits = Field(default_factory=QuotaLimits)


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: dict[str, KeyEntry] = Field(default_factory=dict)
    tenants: dict[str, TenantEntry] = Field(default_factory=dict)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    tenant: str
    key_id: str  # "" for JWT callers
    models: frozenset[str]  # empty = all
    priority_max: str
    key_limits: QuotaLimits
    tenant_limits: QuotaLimits

    def may_use(self, model: str) -> bool:
        return not self.models or model in self.models


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """(key id, full key). Keys carry 256 bits of randomness, so one SHA-256 suffices."""
    key_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def read_key_file(path: Path) -> KeyFile:
    data = yaml.safe_load(path.read_text()) if path.exists() else None
    try:
        return KeyFile.model_validate(data or {})
    except ValidationError as err:
        where = "; ".join(".".join(str(p) for p in e["loc"]) + ": " + e["msg"] for e in err.errors())
        raise ValueError(f"key file {path}: {where}") from None


def write_key_file(path: Path, kf: KeyFile) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    header = "# API keys of the inference gateway, managed by igw-keys. Hashes only: keys are shown once.\n"
    tmp.write_text(header + yaml.safe_dump(kf.model_dump(), sort_keys=True))
    tmp.chmod(0o600)
    tmp.replace(path)  # atomic: a reload never sees half a file


def _unauthenticated(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.UNAUTHENTICATED, message)


class Authenticator:
    def __init__(self, cfg: AuthConfig):
        self.cfg = cfg
        self.key_file = Path(cfg.key_file) if cfg.key_file else None
        self._keys = KeyFile()
        self._mtime: float | None = None
        self._edge_secret = b""
        if cfg.mode == "jwt":
            self._edge_secret = Path(cfg.edge_secret_file).read_bytes().strip()
        self.reload()

    # --- key file ---------------------------------------------------------------------

    def reload(self) -> bool:
        """Read the key file; on error keep the keys in force. True if it changed."""
        if self.key_file is None:
            return False
        try:
            mtime = self.key_file.stat().st_mtime
            self._keys = read_key_file(self.key_file)
            self._mtime = mtime
        except (OSError, ValueError, yaml.YAMLError) as err:
            log.error("key file not reloaded, previous keys stay in force: %s", err)
            return False
        log.info("key file loaded: %d keys (%d revoked), %d tenants", len(self._keys.keys),
                 sum(k.revoked for k in self._keys.keys.values()), len(self._keys.tenants))
        return True

    async def watch(self) -> None:
        """Reload whenever the file's modification time changes."""
        while True:
            await asyncio.sleep(self.cfg.reload_interval_s)
            try:
                mtime = self.key_file.stat().st_mtime if self.key_file else None
            except OSError:
                continue
            if mtime is not None and mtime != self._mtime:
                self.reload()

    def tenant_limits(self, tenant: str) -> QuotaLimits:
        entry = self._keys.tenants.get(tenant)
        return entry.limits if entry else QuotaLimits()

    # --- requests ---------------------------------------------------------------------

    def authenticate(self, metadata: tuple[tuple[str, str | bytes], ...]) -> Principal:
        md: dict[str, str] = {}
        for k, v in metadata or ():
            if isinstance(v, str):
                md.setdefault(k.lower(), v)
        if self.cfg.mode == "none":
            t = self.cfg.anonymous_tenant
            return Principal(t, "", frozenset(), "interactive", QuotaLimits(), self.tenant_limits(t))
        if self.cfg.mode == "jwt":
            return self._from_jwt(md)
        return self._from_key(md)

    def _from_key(self, md: dict[str, str]) -> Principal:
        presented = md.get("x-api-key", "")
        auth = md.get("authorization", "")
        if not presented and auth:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise _unauthenticated("the authorization header must be `Bearer <API key>`")
            presented = token.strip()
        if not presented:
            raise _unauthenticated("an API key is required: send `authorization: Bearer <key>` or `x-api-key: <key>`")
        m = _KEY.match(presented)
        entry = self._keys.keys.get(m.group(1)) if m else None
        # Hash and compare even for unknown ids, so timing says nothing about which ids exist.
        digest = hash_key(presented)
        expected = entry.sha256 if entry else "0" * 64
        if not hmac.compare_digest(digest, expected) or entry is None:
            raise _unauthenticated("the API key is not valid")
        key_id = m.group(1)
        if entry.revoked:
            raise _unauthenticated(f"API key {key_id} has been revoked")
        return Principal(entry.tenant, key_id, frozenset(entry.models), entry.priority_max,
                         entry.limits, self.tenant_limits(entry.tenant))

    def _from_jwt(self, md: dict[str, str]) -> Principal:
        got = md.get(EDGE_SECRET_HEADER, "").encode()
        if not got or not hmac.compare_digest(got, self._edge_secret):
            # Claim headers on a request that did not pass Envoy are forged or misrouted.
            raise _unauthenticated("requests must come through the edge proxy (Envoy), which verifies the JWT")
        raw = md.get(self.cfg.jwt_payload_header, "")
        try:
            claims = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        except (ValueError, json.JSONDecodeError):
            raise _unauthenticated("no verified JWT claims arrived from the edge proxy") from None
        tenant = claims.get(self.cfg.tenant_claim) if isinstance(claims, dict) else None
        if not isinstance(tenant, str) or not tenant:
            raise _unauthenticated(f"the JWT has no `{self.cfg.tenant_claim}` claim to name the tenant")
        return Principal(tenant, "", frozenset(), "interactive", QuotaLimits(), self.tenant_limits(tenant))


def permission_denied_model(principal: Principal, model: str) -> RpcError:
    who = f"API key {principal.key_id}" if principal.key_id else f"tenant {principal.tenant}"
    return RpcError(grpc.StatusCode.PERMISSION_DENIED,
                    f"model: {who} may not use model {model!r}; it may use {', '.join(sorted(principal.models))}")


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
