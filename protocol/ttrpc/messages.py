"""The ``ttrpc.Request`` / ``ttrpc.Response`` envelopes (spec ttrpc.md §3, §5).

The rest of the package sees plain tuples; only this module knows the wire encoding,
so it has a single seam. What a client does (encode a request, decode a response) is
written out with protocol.wire: a short-lived client such as the `pyshim` CLI then
never imports the protobuf runtime (tests hold the bytes to the generated classes).
A server's request decoding, which must take whatever a peer sends, stays on the
generated class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from protocol import wire

if TYPE_CHECKING:
    from collections.abc import Iterable

    from protocol.proto import ttrpc_pb2

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
    """Field-number order and proto3 defaults left out, as protobuf writes it."""
    metadata = b"".join(
        wire.field_bytes(5, wire.field_str(1, k) + wire.field_str(2, v), always=True)
        for k, v in req.metadata
    )
    return (
        wire.field_str(1, req.service)
        + wire.field_str(2, req.method)
        + wire.field_bytes(3, req.payload)
        + wire.field_varint(4, req.timeout_nano)
        + metadata
    )


def decode_request(data: bytes) -> RequestMessage:
    from google.protobuf.message import DecodeError

    from protocol.proto import ttrpc_pb2

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
        return wire.field_bytes(2, resp.payload)
    status = wire.field_varint(1, resp.code) + wire.field_str(2, resp.message)
    return wire.field_bytes(1, status, always=True)


def decode_response(data: bytes) -> ResponseMessage:
    """protobuf's reading: last value wins, a repeated ``status`` merges, fields of a
    wire type other than declared are unknown fields (skipped)."""
    code, message, payload = 0, "", b""
    try:
        for number, wire_type, value in wire.iter_fields(data):
            if wire_type != wire.LEN:
                continue
            assert isinstance(value, bytes)
            if number == 2:
                payload = value
            elif number == 1:
                for n, wt, v in wire.iter_fields(value):
                    if n == 1 and wt == wire.VARINT:
                        assert isinstance(v, int)
                        # int32, as protobuf reads it: the low 32 bits, signed.
                        v &= 0xFFFF_FFFF
                        code = v - (1 << 32) if v >> 31 else v
                    elif n == 2 and wt == wire.LEN:
                        assert isinstance(v, bytes)
                        message = v.decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageDecodeError(_detail(exc)) from exc
    if code != 0:
        return ResponseMessage(code=code, message=message)
    return ResponseMessage(payload=payload)


def _pairs(kvs: Iterable[ttrpc_pb2.KeyValue]) -> tuple[tuple[str, str], ...]:
    return tuple((kv.key, kv.value) for kv in kvs)


def _detail(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
