"""The ``ttrpc.Request`` / ``ttrpc.Response`` envelopes (spec ttrpc.md §3, §5).

The rest of the package sees plain dataclasses; only this module knows the generated
protobuf classes, so the wire encoding has a single seam.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from google.protobuf.message import DecodeError, EncodeError

from protocol.proto import ttrpc_pb2
from protocol.proto.rpc import status_pb2

__all__ = [
    "MessageDecodeError",
    "RequestMessage",
    "ResponseMessage",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
]


class MessageDecodeError(ValueError):
    """The bytes are not a valid encoding of the envelope; ``str()`` is the detail."""


class RequestMessage(NamedTuple):
    service: str
    method: str
    payload: bytes = b""
    # 0 = no deadline; negative = a deadline that had already passed when sent.
    timeout_nano: int = 0
    # (key, value) pairs in wire order; a key may repeat.
    metadata: tuple[tuple[str, str], ...] = ()


class ResponseMessage(NamedTuple):
    # 0 = success (whether the status field was absent or present with code 0).
    code: int = 0
    message: str = ""
    payload: bytes = b""


def encode_request(req: RequestMessage) -> bytes:
    msg = ttrpc_pb2.Request(
        service=req.service,
        method=req.method,
        payload=req.payload,
        timeout_nano=req.timeout_nano,
        metadata=[ttrpc_pb2.KeyValue(key=k, value=v) for k, v in req.metadata],
    )
    try:
        return msg.SerializeToString()
    except EncodeError as exc:  # pragma: no cover - every field here is always set
        raise ValueError(str(exc)) from exc


def decode_request(data: bytes) -> RequestMessage:
    msg = ttrpc_pb2.Request()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise MessageDecodeError(_detail(exc)) from exc
    return RequestMessage(
        service=msg.service,
        method=msg.method,
        payload=msg.payload,
        timeout_nano=msg.timeout_nano,
        metadata=_pairs(msg.metadata),
    )


def encode_response(resp: ResponseMessage) -> bytes:
    """Success omits ``status`` entirely (as Go does), so an empty result encodes to
    zero bytes; failure carries ``status`` and no payload (spec §5)."""
    if resp.code == 0:
        return ttrpc_pb2.Response(payload=resp.payload).SerializeToString()
    status = status_pb2.Status(code=resp.code, message=resp.message)
    return ttrpc_pb2.Response(status=status).SerializeToString()


def decode_response(data: bytes) -> ResponseMessage:
    msg = ttrpc_pb2.Response()
    try:
        msg.ParseFromString(data)
    except DecodeError as exc:
        raise MessageDecodeError(_detail(exc)) from exc
    if msg.HasField("status") and msg.status.code != 0:
        return ResponseMessage(code=msg.status.code, message=msg.status.message)
    return ResponseMessage(payload=msg.payload)


def _pairs(kvs: Iterable[ttrpc_pb2.KeyValue]) -> tuple[tuple[str, str], ...]:
    return tuple((kv.key, kv.value) for kv in kvs)


def _detail(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
