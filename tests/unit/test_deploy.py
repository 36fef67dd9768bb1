"""Containers and Kubernetes manifests, checked statically (no Docker engine or cluster runs here)."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from igw_common import config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
sys.path.insert(0, str(K8S))
import render as k8s_render  # noqa: E402  (deploy/k8s/render.py)

DOCS = list(yaml.safe_load_all((K8S / "igw.yaml").read_text()))
CFG = config.load(ROOT / "config" / "k8s.yaml")


def find(kind: str, name: str) -> dict:
    return next(d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name)


def test_committed_manifests_are_what_the_renderer_makes():
    out = subprocess.run([sys.executable, str(K8S / "render.py")], capture_output=True, text=True, check=True).stdout
    assert out == (K8S / "igw.yaml").read_text(), "run: python deploy/k8s/render.py --out deploy/k8s/igw.yaml"


@pytest.mark.parametrize("doc", DOCS, ids=[f"{d['kind']}/{d['metadata']['name']}" for d in DOCS])
def test_manifest_validates_offline(doc):
    kubernetes_validate.validate(doc, k8s_render.K8S_VERSION, strict=True)


def test_the_validator_does_reject_a_broken_manifest():
    broken = copy.deepcopy(find("Deployment", "igw-gateway"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "not-a-port"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, k8s_render.K8S_VERSION, strict=True)


def test_gateway_invariants():
    dep = find("Deployment", "igw-gateway")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert dep["spec"]["replicas"] >= 2
    assert c["readinessProbe"]["grpc"] == {"port": 50051, "service": "gateway.v1.Gateway"}
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    g = CFG.gateway
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + g.drain_notice_s + g.drain_grace_s
    hpa = find("HorizontalPodAutoscaler", "igw-gateway")
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert (
        kinds["Resource"]["resource"]["name"] == "cpu" and kinds["Pods"]["pods"]["metric"]["name"] == "igw_queue_depth"
    )
    assert find("Service", "igw-gateway")["spec"]["clusterIP"] == "None"
    assert find("PodDisruptionBudget", "igw-gateway")["spec"]["minAvailable"] >= 1


def test_worker_invariants():
    sts = find("StatefulSet", "igw-worker")
    pod = sts["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 600  # model load takes minutes
    assert any(m["mountPath"] == "/models" for m in c["volumeMounts"])
    assert pod["terminationGracePeriodSeconds"] >= CFG.worker.drain_grace_s
    svc = find("Service", "igw-worker")
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == "igw-worker"
    assert CFG.gateway.worker_dns == ["igw-worker.igw.svc.cluster.local:50061"]
    assert find("PodDisruptionBudget", "igw-worker")["spec"]["maxUnavailable"] == 1


def test_network_policies_isolate_gateways_and_workers():
    pols = {d["metadata"]["name"]: d for d in DOCS if d["kind"] == "NetworkPolicy"}
    assert pols["default-deny"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    gw = pols["gateway-from-envoy"]["spec"]
    assert gw["ingress"][0]["from"] == [{"podSelector": {"matchLabels": k8s_render.labels("envoy")}}]
    wk = pols["worker-from-gateway"]["spec"]
    assert wk["ingress"][0]["from"] == [{"podSelector": {"matchLabels": k8s_render.labels("gateway")}}]
    assert pols["redis-from-gateway"]["spec"]["ingress"][0]["from"] == wk["ingress"][0]["from"]
    # Nothing but Envoy is reachable from outside the cluster.
    open_to_all = [
        n for n, p in pols.items() if any("ipBlock" in f for r in p["spec"].get("ingress", []) for f in r["from"])
    ]
    assert open_to_all == ["envoy-from-anywhere"]


def test_no_secret_values_in_plain_manifests():
    assert not [d for d in DOCS if d["kind"] == "Secret"]
    text = (K8S / "igw.yaml").read_text()
    assert not re.search(r"(?i)(password|token|secret_key|BEGIN [A-Z ]*PRIVATE KEY)\s*[:=]", text)
    secret_refs = set(re.findall(r"secretName: (\S+)", text))
    assert secret_refs == {"igw-api-keys", "igw-tls"}
    ops = (ROOT / "docs" / "operations.md").read_text()
    for name in secret_refs:
        assert "kubectl -n igw create secret" in ops and name in ops


@pytest.mark.parametrize(
    "name, ports, script",
    [
        ("gateway.Dockerfile", {50051, 50052, 9464, 8080}, "igw-gateway"),
        ("worker-gpu.Dockerfile", {50061, 9465}, "igw-worker"),
        ("worker-cpu.Dockerfile", {50061, 9465}, "igw-worker"),
    ],
)
def test_dockerfiles(name, ports, script):
    text = (ROOT / "deploy" / "docker" / name).read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) >= 2, "multi-stage: build tools stay in the build stage"
    final = stages[-1]
    assert final.split()[0] == "python:3.11-slim"
    assert re.search(r"^USER 10001$", final, re.M), "the final image runs as a non-root user"
    assert not re.search(r"apt-get install|gcc|build-essential|grpcio-tools", final)
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", final, re.M) for p in line.split()}
    assert exposed == ports
    defaults = config.Config()
    assert (
        {int(defaults.gateway.listen.rpartition(":")[2]), int(defaults.gateway.metrics_listen.rpartition(":")[2])}
        <= ports
        if "gateway" in name
        else {int(defaults.worker.listen.rpartition(":")[2]), int(defaults.worker.metrics_listen.rpartition(":")[2])}
        == ports
    )
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"\]', final, re.M).group(1)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry == script and entry in scripts
    if "gpu" in name:
        assert "'.[gpu]'" in text  # PyPI's vllm


def test_worker_images_carry_no_gateway_code():
    for name in ("worker-cpu.Dockerfile", "worker-gpu.Dockerfile"):
        text = (ROOT / "deploy" / "docker" / name).read_text()
        copies = re.findall(r"^COPY (\S+) ", text, re.M)
        assert "gateway" not in copies and {"igw_common", "inference"} <= set(copies), (name, copies)
        assert "gateway.proto" not in text
