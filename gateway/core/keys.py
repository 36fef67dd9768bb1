"""The API key file: its format, how keys are made and hashed, and safe writes.

API keys look like ``igw_<key id>_<secret>``. The key file (YAML, written by
``igw-keys``) stores only the SHA-256 of each key with its tenant, allowed
models, limits and priority cap; the key id, a public prefix, finds the entry.
``gateway.core.auth`` reads it; ``igw-keys`` (``gateway.keys_cli``) edits it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import os
import re
import secrets
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.vocabulary import INTERACTIVE, PRIORITIES
from igw_common.config import QuotaLimits

KEY_PREFIX = "igw"
KEY_PATTERN = re.compile(r"igw_([a-z0-9]{12})_([A-Za-z0-9_-]{32,})")


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tenant: str = Field(min_length=1)
    models: list[str] = Field(default_factory=list, description="models this key may use; empty = all")
    priority_max: Literal[PRIORITIES] = INTERACTIVE  # the highest class the key may ask for
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


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
