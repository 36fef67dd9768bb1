"""The import graph: gateway and worker meet only through the generated protos.

- nothing under ``inference/`` imports ``gateway`` (the worker image carries no gateway code);
- ``gateway/`` takes from ``inference`` only its generated protos (``inference.v1``);
- ``igw_common`` imports neither.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imports(package: str) -> dict[str, set[str]]:
    """Module path -> every module it imports (absolute names)."""
    out = {}
    for path in (ROOT / package).rglob("*.py"):
        if "/v1/" in path.as_posix():  # generated code
            continue
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
        out[path.relative_to(ROOT).as_posix()] = names
    return out


def test_inference_never_imports_gateway():
    bad = {
        m: sorted(n for n in names if n == "gateway" or n.startswith("gateway."))
        for m, names in imports("inference").items()
    }
    assert not {m: n for m, n in bad.items() if n}


def test_gateway_takes_only_the_protos_from_inference():
    bad = {
        m: sorted(
            n for n in names if (n == "inference" or n.startswith("inference.")) and not n.startswith("inference.v1")
        )
        for m, names in imports("gateway").items()
    }
    assert not {m: n for m, n in bad.items() if n}


def test_the_shared_package_depends_on_neither():
    bad = {
        m: sorted(n for n in names if n.split(".")[0] in ("gateway", "inference"))
        for m, names in imports("igw_common").items()
    }
    assert not {m: n for m, n in bad.items() if n}
