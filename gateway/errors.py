"""gRPC errors with a message a person can act on, plus google.rpc details.

Handlers raise ``RpcError``; the servicer turns it into a status with rich
details (``grpc-status-details-bin``) via grpcio-status, so clients that
understand google.rpc.Status get the structured form and others still get a
clear message.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


class RpcError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, details: tuple = ()):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def to_status(self) -> grpc.Status:
        packed = []
        for d in self.details:
            a = any_pb2.Any()
            a.Pack(d)
            packed.append(a)
        return rpc_status.to_status(status_pb2.Status(code=self.code.value[0], message=self.message, details=packed))


def invalid_argument(field: str, description: str) -> RpcError:
    detail = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=description)]
    )
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {description}", (detail,))


def model_not_found(name: str, available: list[str]) -> RpcError:
    have = ", ".join(repr(m) for m in available) or "none right now"
    detail = error_details_pb2.ResourceInfo(resource_type="model", resource_name=name, description=f"available: {have}")
    return RpcError(grpc.StatusCode.NOT_FOUND, f"model: unknown model {name!r}; available models: {have}", (detail,))


def unavailable(message: str, retry_after_s: float | None = None) -> RpcError:
    details = ()
    if retry_after_s is not None:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromMilliseconds(int(retry_after_s * 1000))
        details = (info,)
    return RpcError(grpc.StatusCode.UNAVAILABLE, message, details)
