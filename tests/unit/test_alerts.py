"""Alert rules and the Grafana dashboard: valid PromQL over metrics that exist (promtool from Debian's prometheus)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import GatewayMetrics, PoolCollector

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "igw-dashboard.json"


def exported_series() -> set[str]:
    """Every series name the gateway and worker export."""
    from inference.metrics import WorkerMetrics
    from inference.session import Counters

    class Engine:
        def unfinished_requests(self):
            return 0

    class Pool:
        workers = []

    gm = GatewayMetrics()
    gm.registry.register(PoolCollector(Pool()))
    gm.queue_depth.labels("interactive").set(0)
    for h in (gm.ttft, gm.duration):
        h.labels("m", "p").observe(1)
    gm.itl.labels("m").observe(1)
    gm.queue_wait.labels("m", "interactive").observe(1)
    wm = WorkerMetrics(Counters(), Engine(), 1)
    names = set()
    for reg in (gm.registry, wm.registry):
        text = generate_latest(reg).decode()
        names |= set(re.findall(r"^# TYPE (\S+)", text, re.M))
        for fam in text_string_to_metric_families(text):
            names |= {s.name for s in fam.samples}
            if fam.type == "counter":
                names.add(fam.name + "_total")
            if fam.type == "histogram":
                names |= {fam.name + sfx for sfx in ("_bucket", "_count", "_sum")}
    return names


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(igw_[a-z_]+)\b", expr))


def test_rules_pass_promtool_check_and_unit_tests():
    check = subprocess.run(["promtool", "check", "rules", str(PROM / "alerts.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=PROM, capture_output=True, text=True)
    assert test.returncode == 0, test.stdout + test.stderr


def test_rules_cover_what_operators_need_and_use_real_metrics():
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert {
        "IGWHighErrorRate",
        "IGWHighLatencyP95",
        "IGWTokenUsageSpike",
        "IGWTimeToFirstTokenP95High",
        "IGWQueueSaturated",
    } <= names
    exported = exported_series()
    for r in rules:
        assert metric_names(r["expr"]) <= exported, (r["alert"], metric_names(r["expr"]) - exported)
    ops = (ROOT / "docs" / "operations.md").read_text()
    for n in names:
        assert n in ops, f"docs/operations.md does not explain {n}"


def test_dashboard_queries_are_valid_promql_over_real_metrics(tmp_path):
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(dash["panels"]) >= 10
    exported = exported_series()
    for e in exprs:
        assert metric_names(e) <= exported, (e, metric_names(e) - exported)
    # promtool parses PromQL only inside rule files: wrap each query as a recording rule.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"igw:dashboard:{i}", "expr": e.replace("$__rate_interval", "5m")}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    check = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
