"""`make bench` in its CI-sized form, so it cannot rot (figures are not asserted: machines are noisy)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.vllm


def test_bench_short_mode_runs_to_completion(vllm_stack, stock_vllm_grpc, tmp_path):
    out = tmp_path / "bench"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--short",
            "--out",
            str(out),
            "--vllm-worker",
            vllm_stack.worker,
            "--vllm-target",
            vllm_stack.envoy,
            "--stock-vllm",
            stock_vllm_grpc.worker,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    results = json.loads((out / "report.json").read_text())
    assert set(results["synthetic"]["scenarios"]) == {"1", "16"}
    assert set(results["vllm"]["scenarios"]) == {"1", "8"}
    assert set(results["peer-synthetic"]["scenarios"]) == {"1", "16"}
    assert set(results["peer-vllm"]["scenarios"]) == {"1", "4"}
    for name in ("synthetic", "vllm", "peer-synthetic", "peer-vllm"):
        for paths in results[name]["scenarios"].values():
            assert "direct" in paths and "envoy+gateway" in paths
            for p, m in paths.items():
                if p != "ours_vs_smg":
                    assert m["errors"] == 0 and m["tokens"] > 0 and m["tokens_per_s"] > 0, (name, p, m)
            assert paths["envoy+gateway"]["tokens_per_s_vs_direct"] > 0
    for name in ("peer-synthetic", "peer-vllm"):
        for paths in results[name]["scenarios"].values():
            assert paths["smg"]["proxy_cpu_s_per_1k_tokens"] > 0 and paths["ours_vs_smg"]["tokens_per_s"] > 0
            assert paths["envoy+gateway"]["proxy_cpu_s_per_1k_tokens"] > 0
    assert "proxy_cpu_s_per_1k_tokens" in results["synthetic"]["scenarios"]["16"]["gateway"]
    assert "relative to SMG" in (out / "report.md").read_text()
    typed = results["typist"]
    for mode in ("with", "without"):
        assert typed[mode]["delivered_tokens"] > 0 and typed[mode]["lost_last_answers"] == 0
    assert "As-you-type completion" in (out / "report.md").read_text()
    assert (out / "report.md").read_text().startswith("# Gateway benchmark")
    assert (out / "ttft.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_costs_mode_splits_the_gateways_cpu():
    r = subprocess.run(
        [sys.executable, "-m", "bench.profile", "--costs", "--streams", "2", "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    out = yaml.safe_load(r.stdout)
    fixed = out["requests of 1 token"]
    assert fixed["CPU ms per request"] > 0
    # The floor: the bare grpc.aio server answered the same client in the same run.
    assert fixed["bare grpc.aio server, requests/s"] > 0 and fixed["bare grpc.aio server, CPU ms per request"] > 0
    assert fixed["gateway / bare"] > 0
    assert out["256 tokens, a message per step"]["bare grpc.aio server, CPU us per token, net"] >= 0
    for shape in ("256 tokens, a message per step", "256 tokens, 25 ms interval"):
        assert out[shape]["tokens/s"] > 0 and out[shape]["CPU us per token, all in"] > 0
    # Merging steps puts several tokens in a message (1,000 tokens/s per stream, 25 ms).
    assert (
        out["256 tokens, 25 ms interval"]["tokens per message"]
        > 2 * out["256 tokens, a message per step"]["tokens per message"]
    )


def test_profile_ceiling_mode_compares_the_gateway_with_a_bare_relay():
    r = subprocess.run(
        [sys.executable, "-m", "bench.profile", "--ceiling", "--streams", "2", "--seconds", "1", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    out = yaml.safe_load(r.stdout)
    for shape in ("64 tokens per request, default interval", "requests of 1 token"):
        # Both servers streamed from the same worker; the ratios are computed from real figures.
        for server in ("gateway", "bare relay"):
            assert out[shape][server]["tokens/s"] > 0 and out[shape][server]["CPU ms per request"] > 0
        assert out[shape]["gateway / bare relay"]["CPU us per token"] > 0
    # Each relayed every token of its requests (counted over a window, so a request may straddle an edge).
    for server in ("gateway", "bare relay"):
        assert 48 <= out["64 tokens per request, default interval"][server]["tokens per request"] <= 80
        assert 0.5 <= out["requests of 1 token"][server]["tokens per request"] <= 1.5
