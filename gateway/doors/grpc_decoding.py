"""Decoding gRPC request bodies so that one protobuf cannot decode is INVALID_ARGUMENT naming the field.

gRPC hands a body protobuf refuses (``context`` nested deeper than protobuf allows, invalid UTF-8 in
a string) to its own error path, which answers UNKNOWN with nothing a person can act on. Our
deserializers catch the ``DecodeError`` and decode the body again with a lenient copy of the message
(every string and message field as ``bytes``), to find and name the field at fault: the handler then
gets an ``Undecodable`` instead of a request.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from gateway.errors import RpcError, invalid_argument
from gateway.v1 import gateway_pb2 as gpb


class Undecodable:
    """A request body that protobuf could not decode; the handler answers INVALID_ARGUMENT naming ``field``."""

    def __init__(self, field: str, description: str):
        self.field, self.description = field, description

    def error(self) -> RpcError:
        return invalid_argument(self.field, self.description)


def _lenient(name: str):
    """Message ``name`` with its string and message fields as ``bytes`` (enums as int32), so it decodes
    whatever the real one cannot."""
    proto = descriptor_pb2.FileDescriptorProto()
    gpb.DESCRIPTOR.CopyToProto(proto)
    msg = next(m for m in proto.message_type if m.name == name)
    for f in msg.field:
        if f.type in (f.TYPE_STRING, f.TYPE_MESSAGE, f.TYPE_ENUM):
            f.type = f.TYPE_INT32 if f.type == f.TYPE_ENUM else f.TYPE_BYTES
            f.ClearField("type_name")
    lenient = descriptor_pb2.FileDescriptorProto(
        name=f"igw_lenient_{name}.proto", package="igw.lenient", syntax="proto3", message_type=[msg]
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(lenient)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"igw.lenient.{name}"))


_LENIENT_EXECUTE = _lenient("ExecuteRequest")
# ExecuteRequest's message fields, decoded on their own to tell which one is at fault.
_SUBMESSAGES = {"context": gpb.ExecuteRequest().context.__class__, "sampling": gpb.SamplingParams}


def _explain_execute(data: bytes) -> Undecodable:
    try:
        raw = _LENIENT_EXECUTE.FromString(data)
    except DecodeError:
        return Undecodable("request", "the body is not a gateway.v1.ExecuteRequest message")
    for f in _LENIENT_EXECUTE.DESCRIPTOR.fields:
        if f.is_repeated or f.type != f.TYPE_BYTES:
            continue
        value = getattr(raw, f.name)
        if f.name in _SUBMESSAGES:
            try:
                _SUBMESSAGES[f.name].FromString(value)
            except DecodeError:
                why = (
                    "nested too deeply or malformed; keep it within gateway.limits.max_context_depth levels"
                    if f.name == "context"
                    else "cannot be decoded"
                )
                return Undecodable(f.name, why)
        elif not _is_utf8(value):
            return Undecodable(f.name, "is not valid UTF-8")
    return Undecodable("messages", "a chat message cannot be decoded (invalid UTF-8 or malformed)")


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


def safe_deserializer(data: bytes):
    """ExecuteRequest, or an ``Undecodable`` naming the field at fault."""
    try:
        return gpb.ExecuteRequest.FromString(data)
    except DecodeError:
        return _explain_execute(data)


def safe(cls):
    """A deserializer for a request of strings (and, for SubmitJobRequest, an ExecuteRequest): what protobuf
    cannot decode becomes an ``Undecodable`` naming the field."""
    lenient = _lenient(cls.DESCRIPTOR.name)

    def explain(data: bytes) -> Undecodable:
        try:
            raw = lenient.FromString(data)
        except DecodeError:
            return Undecodable("request", f"the body is not a {cls.DESCRIPTOR.full_name} message")
        for f in lenient.DESCRIPTOR.fields:
            if f.type != f.TYPE_BYTES or f.is_repeated:
                continue
            value = getattr(raw, f.name)
            if f.name == "request":  # SubmitJobRequest.request: an ExecuteRequest
                try:
                    gpb.ExecuteRequest.FromString(value)
                except DecodeError:
                    inner = _explain_execute(value)
                    return Undecodable(f"request.{inner.field}", inner.description)
            elif not _is_utf8(value):
                return Undecodable(f.name, "is not valid UTF-8")
        return Undecodable("request", "cannot be decoded")

    def deserialize(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError:
            return explain(data)

    return deserialize
