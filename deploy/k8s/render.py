"""Render the Kubernetes manifests from the gateway config (ports and drain periods come from it).

    python deploy/k8s/render.py --config config/k8s.yaml > deploy/k8s/igw.yaml

One multi-document YAML: namespace, config, Envoy, gateway (+ HPA, PDB),
GPU workers (StatefulSet + headless Service), Redis, NetworkPolicies.
Secrets are referenced, never rendered: create them out of band (docs/operations.md,
"Kubernetes"). A test validates the output offline with kubernetes-validate
and checks that the committed igw.yaml is what this script renders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from igw_common import config as config_mod  # noqa: E402

NS = "igw"
GATEWAY_IMAGE = "ghcr.io/example/igw-gateway:0.1.0"
WORKER_IMAGE = "ghcr.io/example/igw-worker-gpu:0.1.0"
REDIS_IMAGE = "redis:7.2-alpine"
K8S_VERSION = "1.34.0"  # the schema version the manifests are validated against


def port(hostport: str) -> int:
    return int(hostport.rpartition(":")[2])


def labels(component: str) -> dict:
    return {"app.kubernetes.io/name": "igw", "app.kubernetes.io/component": component}


def meta(name: str, component: str, **extra) -> dict:
    return {"name": name, "namespace": NS, "labels": labels(component), **extra}


SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def grpc_probe(p: int, service: str, period: int = 5, failures: int = 3) -> dict:
    return {"grpc": {"port": p, "service": service}, "periodSeconds": period, "failureThreshold": failures}


def render(cfg: config_mod.Config, config_text: str) -> list[dict]:
    g, w, e = cfg.gateway, cfg.worker, cfg.envoy
    gw_port, gw_metrics, wk_port, wk_metrics = (
        port(g.listen),
        port(g.metrics_listen),
        port(w.listen),
        port(w.metrics_listen),
    )
    envoy_port = port(e.listen)
    gw_http = port(g.http_listen) if g.http_listen else None
    pre_stop_s = 5  # endpoints and Envoy's health checks notice the pod is going
    # Kubernetes must wait for: preStop, the drain notice, the drain grace, and a margin.
    gw_grace = int(pre_stop_s + g.drain_notice_s + g.drain_grace_s + 10)
    wk_grace = int(pre_stop_s + w.drain_grace_s + 10)
    config_volume = {"name": "config", "configMap": {"name": "igw-config"}}
    config_mount = {"name": "config", "mountPath": "/etc/igw/config.yaml", "subPath": "config.yaml", "readOnly": True}

    docs: list[dict] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": labels("namespace")}},
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta("igw-config", "config"),
            "data": {"config.yaml": config_text},
        },
    ]

    # --- Envoy: the only thing exposed outside the namespace --------------------------------
    docs += [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta("igw-envoy", "envoy"),
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels("envoy")},
                "template": {
                    "metadata": {"labels": labels("envoy")},
                    "spec": {
                        "terminationGracePeriodSeconds": 30,
                        "initContainers": [
                            {
                                "name": "render-bootstrap",
                                "image": GATEWAY_IMAGE,
                                "command": [
                                    "python",
                                    "-m",
                                    "gateway.envoy_bootstrap",
                                    "--config",
                                    "/etc/igw/config.yaml",
                                    "--out",
                                    "/etc/envoy/envoy.yaml",
                                ],
                                "volumeMounts": [config_mount, {"name": "bootstrap", "mountPath": "/etc/envoy"}],
                                "securityContext": SECURITY,
                                "resources": {
                                    "requests": {"cpu": "50m", "memory": "64Mi"},
                                    "limits": {"memory": "128Mi"},
                                },
                            }
                        ],
                        "containers": [
                            {
                                "name": "envoy",
                                "image": GATEWAY_IMAGE,
                                "command": [
                                    "envoy",
                                    "-c",
                                    "/etc/envoy/envoy.yaml",
                                    "--log-level",
                                    "warn",
                                    "--disable-hot-restart",
                                ],
                                "ports": [{"name": "grpc", "containerPort": envoy_port}],
                                "readinessProbe": {"tcpSocket": {"port": envoy_port}, "periodSeconds": 5},
                                "volumeMounts": [
                                    {"name": "bootstrap", "mountPath": "/etc/envoy", "readOnly": True},
                                    {"name": "tls", "mountPath": "/etc/igw/tls", "readOnly": True},
                                ],
                                "securityContext": SECURITY,
                                "resources": {
                                    "requests": {"cpu": "500m", "memory": "256Mi"},
                                    "limits": {"cpu": "2", "memory": "512Mi"},
                                },
                            }
                        ],
                        "volumes": [
                            config_volume,
                            {"name": "bootstrap", "emptyDir": {}},
                            {"name": "tls", "secret": {"secretName": "igw-tls"}},
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta("igw-envoy", "envoy"),
            "spec": {
                "type": "LoadBalancer",
                "selector": labels("envoy"),
                "ports": [{"name": "grpc", "port": 443 if e.tls.cert_file else 80, "targetPort": envoy_port}],
            },
        },
    ]

    # --- Gateways ----------------------------------------------------------------------------
    docs += [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta("igw-gateway", "gateway"),
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels("gateway")},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                "template": {
                    "metadata": {
                        "labels": labels("gateway"),
                        "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(gw_metrics)},
                    },
                    "spec": {
                        "terminationGracePeriodSeconds": gw_grace,
                        "containers": [
                            {
                                "name": "gateway",
                                "image": GATEWAY_IMAGE,
                                "args": ["--config", "/etc/igw/config.yaml"],
                                "ports": [
                                    {"name": "grpc", "containerPort": gw_port},
                                    {"name": "metrics", "containerPort": gw_metrics},
                                ]
                                + ([{"name": "http", "containerPort": gw_http}] if gw_http else []),
                                "readinessProbe": grpc_probe(gw_port, "gateway.v1.Gateway", period=2, failures=1),
                                "livenessProbe": grpc_probe(gw_port, "", period=10, failures=3),
                                # Let endpoints update before SIGTERM starts the drain.
                                "lifecycle": {"preStop": {"sleep": {"seconds": pre_stop_s}}},
                                "volumeMounts": [
                                    config_mount,
                                    {"name": "keys", "mountPath": "/etc/igw/keys", "readOnly": True},
                                ],
                                "securityContext": SECURITY,
                                "resources": {
                                    "requests": {"cpu": "1", "memory": "512Mi"},
                                    "limits": {"cpu": "2", "memory": "1Gi"},
                                },
                            }
                        ],
                        "volumes": [config_volume, {"name": "keys", "secret": {"secretName": "igw-api-keys"}}],
                    },
                },
            },
        },
        # Headless: Envoy's STRICT_DNS cluster sees every gateway pod and health-checks each.
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta("igw-gateway", "gateway"),
            "spec": {
                "clusterIP": "None",
                "selector": labels("gateway"),
                "ports": [{"name": "grpc", "port": gw_port, "targetPort": gw_port}]
                + ([{"name": "http", "port": gw_http, "targetPort": gw_http}] if gw_http else []),
            },
        },
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": meta("igw-gateway", "gateway"),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "igw-gateway"},
                "minReplicas": 2,
                "maxReplicas": 10,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
                    },
                    # Needs a custom-metrics adapter (e.g. prometheus-adapter) exposing igw_queue_depth.
                    {
                        "type": "Pods",
                        "pods": {
                            "metric": {"name": "igw_queue_depth"},
                            "target": {"type": "AverageValue", "averageValue": "8"},
                        },
                    },
                ],
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
            },
        },
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": meta("igw-gateway", "gateway"),
            "spec": {"minAvailable": 1, "selector": {"matchLabels": labels("gateway")}},
        },
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": meta("igw-envoy", "envoy"),
            "spec": {"minAvailable": 1, "selector": {"matchLabels": labels("envoy")}},
        },
    ]

    # --- GPU workers ---------------------------------------------------------------------------
    docs += [
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": meta("igw-worker", "worker"),
            "spec": {
                "serviceName": "igw-worker",
                "replicas": 2,
                "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": labels("worker")},
                "template": {
                    "metadata": {
                        "labels": labels("worker"),
                        "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(wk_metrics)},
                    },
                    "spec": {
                        "terminationGracePeriodSeconds": wk_grace,
                        "nodeSelector": {"nvidia.com/gpu.present": "true"},
                        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                        "containers": [
                            {
                                "name": "worker",
                                "image": WORKER_IMAGE,
                                "args": ["--config", "/etc/igw/config.yaml"],
                                "ports": [
                                    {"name": "grpc", "containerPort": wk_port},
                                    {"name": "metrics", "containerPort": wk_metrics},
                                ],
                                # Loading a model takes minutes: up to 20 min before liveness applies.
                                "startupProbe": grpc_probe(wk_port, "inference.v1.Worker", period=10, failures=120),
                                "readinessProbe": grpc_probe(wk_port, "inference.v1.Worker", period=5, failures=1),
                                "livenessProbe": grpc_probe(wk_port, "", period=15, failures=4),
                                "lifecycle": {"preStop": {"sleep": {"seconds": pre_stop_s}}},
                                "volumeMounts": [
                                    config_mount,
                                    {"name": "models", "mountPath": "/models"},
                                    {"name": "cache", "mountPath": "/tmp"},
                                    {"name": "shm", "mountPath": "/dev/shm"},
                                ],
                                "securityContext": SECURITY,
                                "resources": {
                                    "requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "1"},
                                    "limits": {"memory": "48Gi", "nvidia.com/gpu": "1"},
                                },
                            }
                        ],
                        "volumes": [
                            config_volume,
                            {"name": "cache", "emptyDir": {}},
                            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
                        ],
                    },
                },
                "volumeClaimTemplates": [
                    {
                        "metadata": {"name": "models"},
                        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "100Gi"}}},
                    }
                ],
            },
        },
        # Headless: gateways resolve one address per worker pod (gateway.worker_dns).
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta("igw-worker", "worker"),
            "spec": {
                "clusterIP": "None",
                "selector": labels("worker"),
                "publishNotReadyAddresses": False,
                "ports": [{"name": "grpc", "port": wk_port, "targetPort": wk_port}],
            },
        },
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": meta("igw-worker", "worker"),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels("worker")}},
        },
    ]

    # --- Redis for shared quotas -----------------------------------------------------------------
    docs += [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta("igw-redis", "redis"),
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels("redis")},
                "template": {
                    "metadata": {"labels": labels("redis")},
                    "spec": {
                        "containers": [
                            {
                                "name": "redis",
                                "image": REDIS_IMAGE,
                                "args": ["--save", "", "--appendonly", "no", "--maxmemory", "256mb"],
                                "ports": [{"name": "redis", "containerPort": 6379}],
                                "readinessProbe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 5},
                                "securityContext": {**SECURITY, "runAsUser": 999},
                                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                                "resources": {
                                    "requests": {"cpu": "100m", "memory": "128Mi"},
                                    "limits": {"memory": "384Mi"},
                                },
                            }
                        ],
                        "volumes": [{"name": "data", "emptyDir": {}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta("igw-redis", "redis"),
            "spec": {"selector": labels("redis"), "ports": [{"name": "redis", "port": 6379, "targetPort": 6379}]},
        },
    ]

    # --- NetworkPolicies: only Envoy reaches gateways, only gateways reach workers and Redis -----
    def allow(name: str, component: str, ports: list[int], from_: list[dict]) -> dict:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta(name, component),
            "spec": {
                "podSelector": {"matchLabels": labels(component)},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": from_, "ports": [{"protocol": "TCP", "port": p} for p in ports]}],
            },
        }

    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    docs += [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta("default-deny", "policy"),
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
        },
        allow("envoy-from-anywhere", "envoy", [envoy_port], [{"ipBlock": {"cidr": "0.0.0.0/0"}}]),
        allow(
            "gateway-from-envoy",
            "gateway",
            [gw_port] + ([gw_http] if gw_http else []),
            [{"podSelector": {"matchLabels": labels("envoy")}}],
        ),
        allow("gateway-metrics", "gateway", [gw_metrics], [monitoring]),
        allow("worker-from-gateway", "worker", [wk_port], [{"podSelector": {"matchLabels": labels("gateway")}}]),
        allow("worker-metrics", "worker", [wk_metrics], [monitoring]),
        allow("redis-from-gateway", "redis", [6379], [{"podSelector": {"matchLabels": labels("gateway")}}]),
    ]
    return docs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "config" / "k8s.yaml"))
    p.add_argument("--out", help="write here instead of stdout")
    args = p.parse_args(argv)
    cfg = config_mod.load_or_exit(args.config)
    text = "# Rendered by deploy/k8s/render.py from config/k8s.yaml; do not edit by hand.\n" + yaml.safe_dump_all(
        render(cfg, Path(args.config).read_text()), sort_keys=False
    )
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
