"""The .proto files are the public contract: every message, field, enum value and rpc is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = sorted((ROOT / "protos").rglob("*.proto"))

# A field, enum value, rpc, message, enum or oneof declaration.
DECL = re.compile(
    r"^\s*(?:(?:optional|repeated)\s+)?(?:[\w.]+\s+\w+\s*=\s*\d+|\w+\s*=\s*\d+|rpc\s+\w+|message\s+\w+|enum\s+\w+|oneof\s+\w+)"
)


def undocumented(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        if not DECL.match(line) or line.strip().startswith("//"):
            continue
        if re.search(r"=\s*0;", line) and "UNSPECIFIED" in line:
            continue  # proto3's mandatory zero value
        if line.strip().startswith(
            ("oneof", "message ListModelsRequest", "message InfoRequest", "message LoadRequest")
        ):
            continue
        prev = lines[i - 1].strip() if i else ""
        if not prev.startswith("//") and "//" not in line:
            missing.append(f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()}")
    return missing


@pytest.mark.parametrize("path", PROTOS, ids=[p.name for p in PROTOS])
def test_every_declaration_is_documented(path):
    assert not undocumented(path)


def test_packages_are_versioned():
    for path in PROTOS:
        pkg = re.search(r"^package\s+([\w.]+);", path.read_text(), re.M).group(1)
        assert re.fullmatch(r"\w+\.v\d+", pkg), pkg
        assert path.parent.name == pkg.split(".")[-1]


def test_generated_code_matches_protos(tmp_path):
    """`make protos` output is not committed; what is imported must come from the current .proto."""
    from importlib import resources

    from grpc_tools import protoc

    rel = [str(p.relative_to(ROOT / "protos")) for p in PROTOS]
    well_known = resources.files("grpc_tools") / "_proto"
    assert protoc.main(["protoc", f"-I{ROOT / 'protos'}", f"-I{well_known}", f"--python_out={tmp_path}", *rel]) == 0
    for r in rel:
        gen = Path(r).with_name(Path(r).stem + "_pb2.py")
        assert (tmp_path / gen).read_text() == (ROOT / gen).read_text(), f"{gen} is stale: run `make protos`"
