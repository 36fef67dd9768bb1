"""A bare grpc.aio server speaking gateway.v1's Execute with nothing behind it: the floor under the
gateway's CPU per request and per message (``python -m bench.profile --costs`` measures both, with the
same client, in the same run).

    python -m bench.bare_grpc --listen 127.0.0.1:PORT

Each call is answered as the gateway answers a request of ``max_tokens`` tokens from a worker at
1,000 tokens/s with no stream interval: Started, then one Delta of one token per 1 ms step, then Done,
on uvloop like the gateway. No auth, quotas, queue, worker hop, metrics or logs: what it costs is what
grpc.aio itself costs for the same calls and messages on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.v1 import gateway_pb2 as gpb
from gateway.v1 import gateway_pb2_grpc as gpb_grpc

STEP_S = 0.001  # the synthetic worker's engine step at 1,000 tokens/s
MAX_TOKENS = 4096  # bounds a call's length (this is a bench tool, but a stray client must not pin it)


class BareGateway(gpb_grpc.GatewayServicer):
    async def Execute(self, request, context):
        yield gpb.ExecuteResponse(started=gpb.Started(request_id="0" * 32, model="synthetic", worker="bare"))
        tokens = max(1, min(request.sampling.max_tokens or 1, MAX_TOKENS))
        for _ in range(tokens):
            await asyncio.sleep(STEP_S)
            yield gpb.ExecuteResponse(delta=gpb.Delta(text=" tok", tokens=1))
        yield gpb.ExecuteResponse(
            done=gpb.Done(
                finish_reason=gpb.FINISH_REASON_LENGTH, usage=gpb.Usage(prompt_tokens=8, completion_tokens=tokens)
            )
        )


async def serve(listen: str, servicer: gpb_grpc.GatewayServicer | None = None) -> None:
    """Serve ``servicer`` (a BareGateway if None) and grpc.health.v1 at ``listen`` until stopped."""
    server = grpc.aio.server()
    gpb_grpc.add_GatewayServicer_to_server(servicer or BareGateway(), server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    server.add_insecure_port(listen)
    await server.start()
    await checks.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="host:port")
    uvloop.run(serve(ap.parse_args(argv).listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
