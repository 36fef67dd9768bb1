"""``igw``: a small command-line client for Execute.

    igw "write a Python function that reverses a string"
    igw --target localhost:8080 --max-tokens 64 --context '{"language": "go"}' "explain this"
    igw --target igw.example.com:443 --tls --api-key "$IGW_KEY" "hello"
    igw --target 127.0.0.1:8443 --ca-file cert.pem --server-name localhost "hello"

Prints the text as it arrives, then one usage line on stderr.

A call that fails before its first token with a status that says sending it again is safe is
sent again (``--retries``, 2 by default): UNAVAILABLE (no replica or worker reachable right now),
or INTERNAL without the gateway's ``grpc-status-details-bin`` trailer, which is how gRPC reports
the reset Envoy sends when the gateway replica serving a stream is lost (docs/api.md). A stream
cut after tokens is never sent again: the text already printed would be repeated.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import time
from pathlib import Path

import grpc
from google.protobuf import struct_pb2

from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc


def build_request(args: argparse.Namespace) -> gpb.ExecuteRequest:
    req = gpb.ExecuteRequest(task=args.task, model=args.model or "", request_id=args.request_id or "")
    if args.context:
        ctx = struct_pb2.Struct()
        ctx.update(json.loads(args.context))
        req.context.CopyFrom(ctx)
    if args.max_tokens is not None:
        req.sampling.max_tokens = args.max_tokens
    if args.temperature is not None:
        req.sampling.temperature = args.temperature
    if args.seed is not None:
        req.sampling.seed = args.seed
    req.sampling.stop.extend(args.stop or [])
    return req


RETRY_BACKOFF_S = 0.25  # before the first retry; doubled for each next one


def _from_gateway(err: grpc.RpcError) -> bool:
    """Every status the gateway sends carries google.rpc details; Envoy's and the transport's do not."""
    return any(k == "grpc-status-details-bin" for k, _ in err.trailing_metadata() or ())


def _lost_replica(err: grpc.RpcError) -> bool:
    """A stream reset under way (the replica serving it died): gRPC reports an HTTP/2 RST_STREAM as
    INTERNAL, and Envoy cannot end a started stream any other way."""
    return err.code() == grpc.StatusCode.INTERNAL and not _from_gateway(err)


def _safe_to_resend(err: grpc.RpcError) -> bool:
    return err.code() == grpc.StatusCode.UNAVAILABLE or _lost_replica(err)


def _is_loopback(target: str) -> bool:
    host = target.rpartition(":")[0].strip("[]") if ":" in target else target
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if not (args.tls or args.ca_file):
        return grpc.insecure_channel(args.target)
    roots = Path(args.ca_file).read_bytes() if args.ca_file else None  # None: the system's roots
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.target, grpc.ssl_channel_credentials(root_certificates=roots), options=options)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="igw", description="Stream one task through the inference gateway.")
    p.add_argument("task", help="the instruction or prompt")
    p.add_argument("--target", default="localhost:8080", help="Envoy or gateway address (default: %(default)s)")
    p.add_argument("--model", help="model name (default: the gateway's default)")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--context", help="JSON object with context (file, language, selection, ...)")
    p.add_argument("--request-id")
    p.add_argument(
        "--timeout", type=float, default=300.0, help="deadline in seconds, retries included (default: %(default)s)"
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="times to resend a call that failed before its first token with UNAVAILABLE or a lost "
        "replica's reset (default: %(default)s)",
    )
    p.add_argument("--api-key", help="sent as `authorization: Bearer ...`")
    p.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS (Envoy's listener with envoy.tls set); implied by --ca-file",
    )
    p.add_argument(
        "--ca-file", help="PEM file of the CA (or self-signed certificate) to trust instead of the system's roots"
    )
    p.add_argument(
        "--server-name", help="name to verify the server's certificate against (default: the host of --target)"
    )
    args = p.parse_args(argv)
    if args.server_name and not (args.tls or args.ca_file):
        p.error("--server-name needs --tls or --ca-file")
    if args.retries < 0:
        p.error("--retries must be 0 or more")

    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
    if args.api_key and not (args.tls or args.ca_file) and not _is_loopback(args.target):
        print(f"igw: warning: sending the API key to {args.target} without TLS; use --tls", file=sys.stderr)
    try:
        channel = _channel(args)
    except OSError as err:
        print(f"error: cannot read --ca-file: {err.filename}: {err.strerror}", file=sys.stderr)
        return 2
    with channel:
        stub = gpb_grpc.GatewayStub(channel)
        deadline = time.monotonic() + args.timeout
        request = build_request(args)
        for attempt in range(args.retries + 1):
            tokens = 0
            try:
                remaining = max(deadline - time.monotonic(), 0.001)
                for resp in stub.Execute(request, timeout=remaining, metadata=metadata):
                    kind = resp.WhichOneof("event")
                    if kind == "delta":
                        tokens += resp.delta.tokens
                        sys.stdout.write(resp.delta.text)
                        sys.stdout.flush()
                    elif kind == "done":
                        d = resp.done
                        sys.stdout.write("\n")
                        print(
                            f"[{gpb.FinishReason.Name(d.finish_reason).removeprefix('FINISH_REASON_').lower()}] "
                            f"prompt_tokens={d.usage.prompt_tokens} completion_tokens={d.usage.completion_tokens} "
                            f"queue_ms={d.timings.queue_ms} ttft_ms={d.timings.ttft_ms} total_ms={d.timings.total_ms}",
                            file=sys.stderr,
                        )
                return 0
            except grpc.RpcError as err:
                pause = RETRY_BACKOFF_S * 2**attempt
                if tokens == 0 and _safe_to_resend(err) and attempt < args.retries:
                    if time.monotonic() + pause < deadline:
                        what = "the replica was lost" if _lost_replica(err) else err.details()
                        print(
                            f"igw: {err.code().name}: {what}; no token had arrived, retrying "
                            f"({attempt + 1}/{args.retries})",
                            file=sys.stderr,
                        )
                        time.sleep(pause)
                        continue
                if _lost_replica(err):
                    where = (
                        f"cut after {tokens} tokens: the answer above is incomplete; run it again to start over"
                        if tokens
                        else "before its first token"
                    )
                    print(
                        f"\nerror: the gateway replica serving this call was lost, {where} (INTERNAL: {err.details()})",
                        file=sys.stderr,
                    )
                else:
                    print(f"\nerror: {err.code().name}: {err.details()}", file=sys.stderr)
                return 1
            except KeyboardInterrupt:
                return 130
    return 1  # not reached: the last attempt returns


if __name__ == "__main__":
    sys.exit(main())
