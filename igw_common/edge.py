"""The edge secret: what proves to a gateway that a request came through Envoy (JWT mode).

Envoy reads it from ``gateway.auth.edge_secret_file`` and adds it to every
request it forwards (``gateway.envoy_bootstrap``); the gateway reads the same file and
compares (``gateway.core.auth``). Both use ``read_edge_secret``, so they never read
the file differently.
"""

from __future__ import annotations

import re
from pathlib import Path

EDGE_SECRET_HEADER = "x-igw-edge-secret"
# Visible ASCII only: it travels as an HTTP/2 header value, which may not hold
# control characters or leading/trailing blanks, and gRPC metadata is ASCII.
_EDGE_SECRET = re.compile(r"[\x21-\x7e]{16,}")


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
        raise ValueError(
            f"gateway.auth.edge_secret_file {path}: the secret must be at least 16 visible ASCII "
            "characters (no spaces or control characters; one trailing newline is fine), "
            "e.g. the output of `openssl rand -hex 32`"
        )
    return secret
