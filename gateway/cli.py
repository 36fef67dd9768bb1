"""``igw``: a small command-line client for Execute.

    igw "write a Python function that reverses a string"
    igw --target localhost:8080 --max-tokens 64 --context '{"language": "go"}' "explain this"

Prints the text as it arrives, then one usage line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

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
    p.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds (default: %(default)s)")
    p.add_argument("--api-key", help="sent as `authorization: Bearer ...`")
    args = p.parse_args(argv)

    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
    with grpc.insecure_channel(args.target) as channel:
        stub = gpb_grpc.GatewayStub(channel)
        try:
            for resp in stub.Execute(build_request(args), timeout=args.timeout, metadata=metadata):
                kind = resp.WhichOneof("event")
                if kind == "delta":
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
        except grpc.RpcError as err:
            print(f"\nerror: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
