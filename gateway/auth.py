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
the token (issuer and audience) against a local JWKS file and forwards the
payload in ``x-jwt-payload``; Envoy also adds ``x-igw-edge-secret``, a shared
secret it reads from ``gateway.auth.edge_secret_file``, and overwrites any
copy a client sent. A request without the right secret never came through
Envoy and is rejected, whatever claim headers it carries. The tenant claim is
bounded in length and charset before it names anything.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import fcntl
import hashlib
import hmac
import json
import logging
import os
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
# Visible ASCII only: it travels as an HTTP/2 header value, which may not hold
# control characters or leading/trailing blanks, and gRPC metadata is ASCII.
_EDGE_SECRET = re.compile(r"[\x21-\x7e]{16,}")
# What a tenant name taken from a JWT claim may look like (its length is bounded by
# gateway.auth.tenant_claim_max_chars): it becomes a quota key, a scheduler queue and
# a log field, so no separators, blanks or control characters.
_TENANT_CLAIM = re.compile(r"[A-Za-z0-9._:@-]+")


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
    """Replace the key file atomically (a reload never sees half a file), mode 0600 throughout.

    The temporary file is created 0600 by open(2) itself (O_EXCL, a unique name in the
    same directory, so os.replace stays a rename on one filesystem): there is no moment
    in which it exists with the umask's mode.
    """
    header = "# API keys of the inference gateway, managed by igw-keys. Hashes only: keys are shown once.\n"
    data = (header + yaml.safe_dump(kf.model_dump(), sort_keys=True)).encode()
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def key_file_lock(path: Path):
    """Exclusive lock for a read-modify-write of the key file (``igw-keys``).

    Held on a sibling ``.lock`` file, not the key file itself: the key file is replaced
    by a rename, so a lock on it would be on an inode no one else opens any more.
    """
    lock = path.parent / f".{path.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_edge_secret(path: str | Path) -> bytes:
    """The edge secret in ``path``, as both Envoy and the gateway use it.

    Envoy's credential injector drops trailing CR/LF from the file and sends the rest
    verbatim, so that is all that is stripped here; anything else that would not
    survive as a header value is refused, naming the file but never the content.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"gateway.auth.edge_secret_file {path}: cannot read it: {err.strerror}") from None
    secret = raw.rstrip(b"\r\n")
    if not _EDGE_SECRET.fullmatch(secret.decode("latin-1")):
        raise ValueError(f"gateway.auth.edge_secret_file {path}: the secret must be at least 16 visible ASCII "
                         "characters (no spaces or control characters; one trailing newline is fine), "
                         "e.g. the output of `openssl rand -hex 32`")
    return secret


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
            self._edge_secret = read_edge_secret(cfg.edge_secret_file)
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

    def tenant_label(self, tenant: str) -> str:
        """The metrics label for ``tenant``: its name when the key file names it (tenants that hold keys or
        have limits: a set the operator controls), else "other", so callers who choose their own tenant
        name (one JWT `sub` per user) cannot grow the label sets without bound."""
        keys = self._keys
        known = getattr(self, "_known_tenants", None)
        if known is None or known[0] is not keys:  # recomputed once per key file reload
            known = self._known_tenants = (keys, set(keys.tenants) | {k.tenant for k in keys.keys.values()})
        return tenant if tenant == self.cfg.anonymous_tenant or tenant in known[1] else "other"

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
        # The value is the caller's to choose: never echoed, only its length.
        limit = self.cfg.tenant_claim_max_chars
        if len(tenant) > limit:
            raise _unauthenticated(f"the JWT's `{self.cfg.tenant_claim}` claim is {len(tenant)} characters long; "
                                   f"a tenant name has at most {limit}")
        if not _TENANT_CLAIM.fullmatch(tenant):
            raise _unauthenticated(f"the JWT's `{self.cfg.tenant_claim}` claim is not a valid tenant name: "
                                   "use letters, digits and . _ : @ - only")
        return Principal(tenant, "", frozenset(), "interactive", QuotaLimits(), self.tenant_limits(tenant))


def permission_denied_model(principal: Principal, model: str) -> RpcError:
    who = f"API key {principal.key_id}" if principal.key_id else f"tenant {principal.tenant}"
    return RpcError(grpc.StatusCode.PERMISSION_DENIED,
                    f"model: {who} may not use model {model!r}; it may use {', '.join(sorted(principal.models))}")


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
