"""The packages work installed, not only from this checkout: the wheel carries the Lua scripts and
generated code they load, and ``igw-stack``'s helpers render Envoy's bootstrap by import, not by a
path into the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
from importlib import resources
from pathlib import Path
target = Path(sys.argv[1]).resolve()
import gateway, igw_stack.launcher, igw_worker_api.v1.worker_pb2
from gateway import envoy_bootstrap
from igw_common import config
for module in (gateway, igw_stack.launcher, igw_worker_api.v1.worker_pb2, envoy_bootstrap):
    assert Path(module.__file__).resolve().is_relative_to(target), module.__file__
for package, script in (("gateway.state.quota", "reserve"), ("gateway.state.jobs", "start"), ("gateway.state.sessions", "append")):
    assert "redis.call" in resources.files(package).joinpath("lua", script + ".lua").read_text(), (package, script)
boot = envoy_bootstrap.render(config.load(None))
assert boot["static_resources"]["clusters"], boot
print("ok")
"""


def _copy(src: Path, dst: Path) -> None:
    """The checkout without its environment, caches and earlier builds (setuptools builds in the source
    tree, and a stale build/ would put modules that no longer exist into the wheel)."""
    skip = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", "bench")
    shutil.copytree(src, dst, ignore=skip)


def test_the_installed_wheel_runs_from_elsewhere(tmp_path):
    wheels, source = tmp_path / "wheels", tmp_path / "source"
    _copy(ROOT, source)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(source),
        ],
        check=True,
        timeout=300,
    )
    target = tmp_path / "site"
    wheel = next(wheels.glob("*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
    )
    # The generated code is not in the repository; the wheel carries what `make protos` made.
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(target)],
        cwd=tmp_path,  # not the checkout: nothing may be found relative to it
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
