"""The config file: defaults, errors that name the key, and the generated reference (docs/configuration.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from igw_common import config

ROOT = Path(__file__).resolve().parents[2]


def test_empty_file_is_the_embedded_default(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("")
    cfg = config.load(p)
    assert cfg == config.Config()
    assert cfg.worker.engine == "vllm" and cfg.worker.vllm.model == "embedded"
    assert cfg.envoy.listen == "127.0.0.1:8080"


def test_shipped_default_config_loads():
    cfg = config.load(ROOT / "config" / "default.yaml")
    assert cfg.gateway.workers[0].address == cfg.worker.listen


@pytest.mark.parametrize(
    "text, key",
    [
        ("gateway:\n  limits:\n    max_task_chars: 0\n", "gateway.limits.max_task_chars"),
        ("gateway:\n  limitz: {}\n", "gateway.limitz: unknown key"),
        ("worker:\n  engine: tensorrt\n", "worker.engine"),
        ("envoy:\n  listen: 8080\n", "envoy.listen"),
        ("envoy:\n  failover:\n    retry_budget_percent: 0\n", "envoy.failover.retry_budget_percent"),
        ("envoy:\n  upstream_keepalive_timeout_ms: 0\n", "envoy.upstream_keepalive_timeout_ms"),
        ("gateway:\n  workers:\n    - address: nohostport\n", "gateway.workers.0.address"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("gateway: {listen: [\n", "not valid YAML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, key):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(config.ConfigError) as info:
        config.load(p)
    assert key in str(info.value)


@pytest.mark.parametrize("module", ["gateway.server", "inference.server"])
def test_processes_refuse_bad_config_at_start(tmp_path, module):
    p = tmp_path / "c.yaml"
    p.write_text("worker:\n  max_concurrent_requests: -1\ngateway:\n  drain_grace_s: -3\n")
    r = subprocess.run([sys.executable, "-m", module, "--config", str(p)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "worker.max_concurrent_requests" in r.stderr and "gateway.drain_grace_s" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_vllm_engine_arg_is_named():
    from inference.vllm_engine import VllmEngine

    cfg = config.parse({"worker": {"vllm": {"model": "/nonexistent", "engine_args": {"tensor_paralel_size": 2}}}})
    with pytest.raises(config.ConfigError) as info:
        VllmEngine("m", cfg.worker.vllm).engine_args()
    assert "worker.vllm.engine_args.tensor_paralel_size" in str(info.value)


def test_vllm_engine_args_pass_through():
    from inference import embedded_model
    from inference.vllm_engine import VllmEngine

    folder = str(embedded_model.prepare())
    cfg = config.parse(
        {
            "worker": {
                "vllm": {
                    "model": folder,
                    "max_model_len": 1024,
                    "engine_args": {"dtype": "float32", "tensor_parallel_size": 1, "enforce_eager": True},
                }
            }
        }
    )
    args = VllmEngine("x", cfg.worker.vllm).engine_args()
    assert (args.model, args.max_model_len, args.dtype, args.enforce_eager) == (folder, 1024, "float32", True)
    assert args.served_model_name == ["x"]


def test_configuration_reference_is_generated_from_the_schema():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == config.reference_page(), "docs/configuration.md is stale: run `make docs`"
    for key, default, _ in config.reference_rows():
        assert f"| `{key}` | `{default}` |" in page


@pytest.mark.parametrize(
    "cfg, names",
    [
        ({"worker": {"min_ping_interval_ms": 30_000}}, ["worker.min_ping_interval_ms", "gateway.worker_keepalive_ms"]),
        (
            {"gateway": {"min_ping_interval_ms": 60_000}},
            ["gateway.min_ping_interval_ms", "envoy.upstream_keepalive_ms"],
        ),
        (
            {"gateway": {"limits": {"max_request_bytes": 32_000_000}}},
            ["worker.max_message_bytes", "gateway.limits.max_request_bytes"],
        ),
        (
            {"gateway": {"processes": 2, "auth": {"mode": "api_key", "key_file": "keys.yaml"}}},
            ["gateway.processes", "gateway.quota.store"],
        ),
        (
            {"gateway": {"processes": 2, "sessions": {"enabled": True}}},
            ["gateway.processes", "gateway.sessions.store"],
        ),
    ],
)
def test_limits_that_meet_across_components_are_checked_together(cfg, names):
    with pytest.raises(config.ConfigError) as info:
        config.parse(cfg)
    for name in names:
        assert name in str(info.value)
