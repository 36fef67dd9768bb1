"""Who is calling: API keys from the key file, or JWT claims verified by Envoy.

API keys (``gateway.core.keys``): the key id, a public prefix of the key, finds its
entry in the key file and the SHA-256 of the key is compared in constant time. A key, its hash or a bearer token
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
import hmac
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from gateway.core.keys import KEY_PATTERN, KeyEntry, KeyFile, hash_key, read_key_file
from gateway.errors import unauthenticated
from gateway.vocabulary import INTERACTIVE
from igw_common.config import NO_LIMITS, AuthConfig, QuotaLimits
from igw_common.edge import EDGE_SECRET_HEADER, read_edge_secret

log = logging.getLogger("gateway.core.auth")

# What a tenant name taken from a JWT claim may look like (its length is bounded by
# gateway.auth.tenant_claim_max_chars): it becomes a quota key, a scheduler queue and
# a log field, so no separators, blanks or control characters.
_TENANT_CLAIM = re.compile(r"[A-Za-z0-9._:@-]+")


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
        log.info(
            "key file loaded: %d keys (%d revoked), %d tenants",
            len(self._keys.keys),
            sum(k.revoked for k in self._keys.keys.values()),
            len(self._keys.tenants),
        )
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
        return entry.limits if entry else NO_LIMITS

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
            return Principal(t, "", frozenset(), INTERACTIVE, NO_LIMITS, self.tenant_limits(t))
        if self.cfg.mode == "jwt":
            return self._from_jwt(md)
        return self._from_key(md)

    def principal_for(self, tenant: str, key_id: str) -> Principal:
        """The caller a background job was submitted by, as the key file says now: a job of a key revoked
        or removed since it was submitted is refused (UNAUTHENTICATED), like a call with that key."""
        if key_id:
            entry = self._keys.keys.get(key_id)
            if entry is None or entry.revoked or entry.tenant != tenant:
                raise unauthenticated(f"API key {key_id}, which submitted this job, was revoked or removed")
            return self._principal(key_id, entry)
        if self.cfg.mode == "api_key":
            raise unauthenticated("this job was submitted without an API key; this gateway requires one")
        return Principal(tenant, "", frozenset(), INTERACTIVE, NO_LIMITS, self.tenant_limits(tenant))

    def _principal(self, key_id: str, entry: KeyEntry) -> Principal:
        return Principal(
            entry.tenant,
            key_id,
            frozenset(entry.models),
            entry.priority_max,
            entry.limits,
            self.tenant_limits(entry.tenant),
        )

    def _from_key(self, md: dict[str, str]) -> Principal:
        presented = md.get("x-api-key", "")
        auth = md.get("authorization", "")
        if not presented and auth:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise unauthenticated("the authorization header must be `Bearer <API key>`")
            presented = token.strip()
        if not presented:
            raise unauthenticated("an API key is required: send `authorization: Bearer <key>` or `x-api-key: <key>`")
        m = KEY_PATTERN.fullmatch(presented)
        entry = self._keys.keys.get(m.group(1)) if m else None
        # Hash and compare even for unknown ids, so timing says nothing about which ids exist.
        digest = hash_key(presented)
        expected = entry.sha256 if entry else "0" * 64
        if not hmac.compare_digest(digest, expected) or entry is None:
            raise unauthenticated("the API key is not valid")
        key_id = m.group(1)
        if entry.revoked:
            raise unauthenticated(f"API key {key_id} has been revoked")
        return self._principal(key_id, entry)

    def _from_jwt(self, md: dict[str, str]) -> Principal:
        got = md.get(EDGE_SECRET_HEADER, "").encode()
        if not got or not hmac.compare_digest(got, self._edge_secret):
            # Claim headers on a request that did not pass Envoy are forged or misrouted.
            raise unauthenticated("requests must come through the edge proxy (Envoy), which verifies the JWT")
        raw = md.get(self.cfg.jwt_payload_header, "")
        try:
            claims = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        except (ValueError, json.JSONDecodeError):
            raise unauthenticated("no verified JWT claims arrived from the edge proxy") from None
        tenant = claims.get(self.cfg.tenant_claim) if isinstance(claims, dict) else None
        if not isinstance(tenant, str) or not tenant:
            raise unauthenticated(f"the JWT has no `{self.cfg.tenant_claim}` claim to name the tenant")
        # The value is the caller's to choose: never echoed, only its length.
        limit = self.cfg.tenant_claim_max_chars
        if len(tenant) > limit:
            raise unauthenticated(
                f"the JWT's `{self.cfg.tenant_claim}` claim is {len(tenant)} characters long; "
                f"a tenant name has at most {limit}"
            )
        if not _TENANT_CLAIM.fullmatch(tenant):
            raise unauthenticated(
                f"the JWT's `{self.cfg.tenant_claim}` claim is not a valid tenant name: "
                "use letters, digits and . _ : @ - only"
            )
        return Principal(tenant, "", frozenset(), INTERACTIVE, NO_LIMITS, self.tenant_limits(tenant))
