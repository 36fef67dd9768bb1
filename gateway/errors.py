"""Errors with a message a person can act on, plus google.rpc details.

The request core raises ``RpcError``; the gRPC front door turns it into a
status with rich details (``grpc-status-details-bin``) via grpcio-status, so
clients that understand google.rpc.Status get the structured form and others
still get a clear message. Each error is made with its ``reason``, the label
under which a refusal is counted in ``igw_rejections_total``.

Nothing a client sent appears in a message unbounded: see ``clip``.
"""

from __future__ import annotations

import math
import re

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


def clip(text: str, limit: int = 64) -> str:
    """At most ``limit`` characters of ``text``: for anything that may carry what a client sent,
    before it goes into a message, a log line or a label."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class RpcError(Exception):
    def __init__(
        self, code: grpc.StatusCode, message: str, details: tuple = (), trailers: tuple = (), reason: str = ""
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.trailers = trailers  # extra trailing metadata, e.g. retry-after
        self.reason = reason  # for metrics: why a request was refused (quota_tokens, queue_full, ...)

    @property
    def field(self) -> str:
        """The request field at fault, for errors that name one (a bad value, an unknown model)."""
        for d in self.details:
            if isinstance(d, error_details_pb2.BadRequest) and d.field_violations:
                return d.field_violations[0].field
            if isinstance(d, error_details_pb2.ResourceInfo):
                return d.resource_type
        return ""

    @property
    def retry_after_s(self) -> float | None:
        for d in self.details:
            if isinstance(d, error_details_pb2.RetryInfo):
                return d.retry_delay.ToMilliseconds() / 1000
        return None

    def renamed(self, names: dict[str, str]) -> RpcError:
        """This error with its field named as a door's client calls it: ``names`` maps a core field
        (``sampling.max_tokens``) to the door's (``max_tokens``); an indexed field keeps its index
        (``sampling.stop[1]`` -> ``stop[1]``); ``[]`` in a name stands for any index
        (``tools[].name`` -> ``tools[].function.name``). Errors that name no mapped field come back as they are."""
        field = self.field
        indexes = re.findall(r"\[\d+\]", field)
        bare = re.sub(r"\[\d+\]", "[]", field)  # the field with its indexes left out, for `[]` names
        matches = [(k, f) for k in names for f in (field, bare) if f == k or f.startswith((k + "[", k + "."))]
        if not matches or not any(isinstance(d, error_details_pb2.BadRequest) for d in self.details):
            return self
        key, form = max(matches, key=lambda m: len(m[0]))  # the most specific name the door has
        new = names[key] + form[len(key) :]
        if form is bare:  # put the indexes back, in order
            parts = new.split("[]")
            new = parts[0] + "".join(i + p for i, p in zip(indexes, parts[1:], strict=False))
        message = self.message
        if message.startswith(field + ":"):
            message = new + message[len(field) :]
        details = tuple(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=new, description=v.description)
                    for v in d.field_violations
                ]
            )
            if isinstance(d, error_details_pb2.BadRequest)
            else d
            for d in self.details
        )
        return RpcError(self.code, message, details, self.trailers, self.reason)

    def to_status(self) -> grpc.Status:
        packed = []
        for d in self.details:
            a = any_pb2.Any()
            a.Pack(d)
            packed.append(a)
        status = rpc_status.to_status(status_pb2.Status(code=self.code.value[0], message=self.message, details=packed))
        return status._replace(trailing_metadata=tuple(status.trailing_metadata) + tuple(self.trailers))


def invalid_argument(field: str, description: str) -> RpcError:
    return field_error(grpc.StatusCode.INVALID_ARGUMENT, field, description, "invalid_argument")


def field_error(code: grpc.StatusCode, field: str, description: str, reason: str) -> RpcError:
    """An error about one request field (a door renames it to its own), with any status code."""
    detail = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=description)]
    )
    return RpcError(code, f"{field}: {description}", (detail,), reason=reason)


def unauthenticated(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.UNAUTHENTICATED, message, reason="unauthenticated")


def permission_denied(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.PERMISSION_DENIED, message, reason="permission_denied")


def model_not_found(name: str, available: list[str]) -> RpcError:
    have = ", ".join(repr(m) for m in available) or "none right now"
    name = clip(name)
    detail = error_details_pb2.ResourceInfo(resource_type="model", resource_name=name, description=f"available: {have}")
    return RpcError(
        grpc.StatusCode.NOT_FOUND,
        f"model: unknown model {name!r}; available models: {have}",
        (detail,),
        reason="invalid_argument",
    )


def unavailable(message: str, retry_after_s: float | None = None, reason: str = "no_worker") -> RpcError:
    details = ()
    if retry_after_s is not None:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromMilliseconds(int(retry_after_s * 1000))
        details = (info,)
    return RpcError(grpc.StatusCode.UNAVAILABLE, message, details, reason=reason)


def deadline_exceeded(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, message, reason="deadline_in_queue")


SUPERSEDED_MESSAGE = "superseded: a newer request with the same supersede_key replaced this one"


def superseded(trailers: tuple = ()) -> RpcError:
    """The request was replaced by a newer one with the same supersede key (ABORTED, ErrorInfo SUPERSEDED)."""
    info = error_details_pb2.ErrorInfo(reason="SUPERSEDED", domain="inference-gateway")
    return RpcError(grpc.StatusCode.ABORTED, SUPERSEDED_MESSAGE, (info,), trailers, reason="superseded")


def resource_exhausted(
    message: str, retry_after_s: float | None, violations: list[tuple[str, str]], reason: str
) -> RpcError:
    """Quota denial: QuotaFailure names each budget; RetryInfo and `retry-after`
    (whole seconds, rounded up) say when to come back, unless waiting cannot help."""
    details: list = [
        error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(subject=subject, description=desc)
                for subject, desc in violations
            ]
        )
    ]
    trailers: tuple = ()
    if retry_after_s is not None:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromMilliseconds(max(1, int(retry_after_s * 1000)))
        details.insert(0, info)
        trailers = (("retry-after", str(max(1, math.ceil(retry_after_s)))),)
        message = f"{message}; retry in {retry_after_s:.1f} s"
    return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, tuple(details), trailers, reason=reason)


# gRPC status -> the HTTP status every HTTP API of the gateway answers with.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(code: grpc.StatusCode) -> int:
    return _HTTP_STATUS.get(code, 500)
