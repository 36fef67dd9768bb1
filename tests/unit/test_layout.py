"""The import graph: gateway and worker meet only through the generated worker protocol, and inside
the gateway a request's walk (doors -> core -> workers and state) never points back up.

- nothing under ``inference/`` imports ``gateway`` (the worker image carries no gateway code), and
  nothing under ``gateway/`` imports ``inference``: both import ``igw_worker_api`` (generated code);
- ``igw_common`` and ``igw_worker_api`` import neither side, and no runtime package imports the
  development tools (``igw_stack``);
- in ``gateway``: doors (and ``native_relay``, the Execute door through the native relay) may import
  the core, workers and state; the core may import workers and
  state; workers and state import neither each other nor anything above them. The shared modules
  (``errors``, ``vocabulary``, ``request``, ``metrics``, ``observe``, generated ``v1``) import none
  of the four.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {
    "doors": 3,
    "native_relay": 3,
    "core": 2,
    "workers": 1,
    "state": 1,
}  # higher may import lower, never the reverse
SHARED = 0  # gateway/*.py that are not wiring: errors, vocabulary, request, metrics, observe
WIRING = ("gateway/server.py", "gateway/cli.py", "gateway/keys_cli.py", "gateway/envoy_bootstrap.py")


def imports(package: str) -> dict[str, set[str]]:
    """Module path -> every module it imports (absolute names)."""
    out = {}
    for path in (ROOT / package).rglob("*.py"):
        if "/v1/" in path.as_posix() or "/v0/" in path.as_posix():  # generated code
            continue
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
        out[path.relative_to(ROOT).as_posix()] = names
    return out


def _top(name: str) -> str:
    return name.split(".")[0]


def test_inference_never_imports_gateway():
    bad = {m: sorted(n for n in names if _top(n) == "gateway") for m, names in imports("inference").items()}
    assert not {m: n for m, n in bad.items() if n}


def test_gateway_never_imports_the_worker():
    bad = {m: sorted(n for n in names if _top(n) == "inference") for m, names in imports("gateway").items()}
    assert not {m: n for m, n in bad.items() if n}


def test_the_shared_packages_depend_on_neither_side():
    for package in ("igw_common", "igw_worker_api"):
        bad = {
            m: sorted(n for n in names if _top(n) in ("gateway", "inference", "igw_stack"))
            for m, names in imports(package).items()
        }
        assert not {m: n for m, n in bad.items() if n}, package


def test_no_runtime_package_imports_the_development_tools():
    for package in ("gateway", "inference", "igw_common"):
        bad = {m: sorted(n for n in names if _top(n) == "igw_stack") for m, names in imports(package).items()}
        assert not {m: n for m, n in bad.items() if n}, package


def _layer(module: str) -> int | None:
    """The layer of a gateway module (path or dotted name); None for the wiring modules."""
    parts = module.removesuffix(".py").replace("/", ".").split(".")
    if parts[0] != "gateway" or len(parts) < 2:
        return None
    if parts[1] in LAYERS:
        return LAYERS[parts[1]]
    if module in WIRING or ".".join(parts[:2]) in {w.removesuffix(".py").replace("/", ".") for w in WIRING}:
        return None
    return SHARED


def test_a_request_s_walk_never_points_back_up():
    bad = []
    for module, names in imports("gateway").items():
        mine = _layer(module)
        if mine is None:
            continue
        for name in names:
            theirs = _layer(name)
            if (
                theirs is None
                and _top(name) == "gateway"
                and name != "gateway.v1"
                and not name.startswith("gateway.v1.")
            ):
                bad.append(f"{module} imports the wiring module {name}")
            elif (
                theirs is not None
                and theirs > 0
                and (theirs > mine or (theirs == mine and theirs == 1 and name.split(".")[1] != module.split("/")[1]))
            ):
                bad.append(f"{module} imports {name}")
    assert not bad, "\n".join(sorted(bad))


def test_the_checker_sees_an_upward_import():
    """The rule above can fail: a core module importing a door is caught."""
    assert _layer("gateway/core/run.py") == 2 and _layer("gateway.doors.grpc_service") == 3
    assert _layer("gateway/errors.py") == SHARED and _layer("gateway/server.py") is None
