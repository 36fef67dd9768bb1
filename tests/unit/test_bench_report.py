"""``bench.run``'s docs writer: a run of some sections (``--only``) replaces their tables and keeps the rest."""

from __future__ import annotations

from bench import run


def _results(section: str, tok_s: float) -> dict:
    path = {
        "tokens_per_s": tok_s,
        "ttft_p50_ms": 1.0,
        "ttft_p99_ms": 2.0,
        "itl_p50_ms": 0.5,
        "itl_p99_ms": 0.9,
        "errors": 0,
        "ttft_ms_all": [1.0],
    }
    return {
        "mode": "full",
        "rounds": 3,
        "machine": "2 cores",
        "date": "2026-11-26",
        "sections": [section],
        section: {"setup": f"setup of {section}.", "scenarios": {1: {"direct": path}}},
    }


def test_a_partial_run_replaces_its_tables_and_keeps_the_others(tmp_path):
    page = tmp_path / "performance.md"
    page.write_text("# Perf\n\nprose before\n\n<!-- bench:begin -->\nold\n<!-- bench:end -->\n\nprose after\n")
    run.write_docs(page, run.report_md(_results("synthetic", 111)))
    run.write_docs(page, run.report_md(_results("peer-vllm", 222)))
    run.write_docs(page, run.report_md(_results("synthetic", 333)))  # measured again
    text = page.read_text()
    assert text.startswith("# Perf\n\nprose before\n") and text.endswith("prose after\n")
    assert "| 333 |" in text and "| 111 |" not in text and "| 222 |" in text
    # the sections stay in the report's order, each says when it was measured, the lead names this run's
    assert text.index(run.TITLES["synthetic"]) < text.index(run.TITLES["peer-vllm"])
    assert text.count("Measured 2026-11-26.") == 2 and "sections: synthetic." in text
    assert "\nold\n" not in text  # what was there and is no report section is dropped
