"""A fast, hypothesis-free input generator for long campaigns.

Hypothesis spends milliseconds per case building structured inputs; for millions of
cases these plain ``random`` generators feed the very same checks at a far higher
rate (no shrinking: a finding prints its seed and input, and becomes a unit test).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Final

from google.protobuf import descriptor as pb_descriptor
from google.protobuf.message import Message

from protocol.proto.ttrpc_pb2 import KeyValue
from protocol.ttrpc.frame import MAX_MESSAGE_SIZE
from protocol.ttrpc.messages import (
    RequestMessage,
    ResponseMessage,
    encode_request,
    encode_response,
)
from tests.fuzz import targets as t

__all__ = ["GENERATORS"]

U32: Final = 0xFFFF_FFFF
_ALPHABET: Final = "abc/.-_\x00é€\U0001f600 C1e\n"


def _bytes(r: random.Random, n: int) -> bytes:
    return r.randbytes(r.randint(0, n))


def _text(r: random.Random, n: int = 24) -> str:
    return "".join(r.choice(_ALPHABET) for _ in range(r.randint(0, n)))


def _sid(r: random.Random) -> int:
    k = r.randint(0, 3)
    if k == 0:
        return r.choice([U32, U32 - 1, 1 << 31])
    if k == 1:
        return r.randint(0, U32)
    return r.randint(0, 12)


def _piece(r: random.Random, body: Callable[[], bytes], max_size: int) -> bytes:
    kind = r.choice(["frame", "frame", "frame", "oversize", "liar", "junk"])
    if kind == "junk":
        return _bytes(r, 40)
    sid = _sid(r)
    type_ = r.choice([1, 1, 1, 2, 3, r.randint(0, 255)])
    flags = 0 if r.random() < 0.7 else r.randint(0, 255)
    if kind == "oversize":
        if max_size >= 1 << 16:
            return t._header(r.choice([max_size + 1, U32, max_size * 2]), sid, type_, flags)
        length = r.randint(max_size + 1, max_size + 80)
        return t._header(length, sid, type_, flags) + r.randbytes(length)
    data = body()
    length = r.randint(0, len(data) + 20) if kind == "liar" else len(data)
    return t._header(length, sid, type_, flags) + data


def _stream(
    r: random.Random, body: Callable[[], bytes] | None = None
) -> tuple[int, bytes, list[int]]:
    max_size = r.choice([0, 1, 10, 64, 300, MAX_MESSAGE_SIZE])
    make = body or (lambda: _bytes(r, 60))
    raw = b"".join(_piece(r, make, max_size) for _ in range(r.randint(0, 8)))
    if r.random() < 0.5:
        raw = _bytes(r, 200) + raw
    cuts = [r.randint(0, max(len(raw), 1)) for _ in range(r.randint(0, 12))]
    return max_size, raw, cuts


def _mutate(r: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(r.randint(0, 3)):
        op = r.randint(0, 2)
        if op == 0 and buf:
            buf[r.randrange(len(buf))] = r.randint(0, 255)
        elif op == 1:
            pos = r.randint(0, len(buf))
            buf[pos:pos] = r.randbytes(r.randint(1, 4))
        elif buf:
            pos = r.randrange(len(buf))
            del buf[pos : pos + r.randint(1, 4)]
    return bytes(buf)


def _request(r: random.Random) -> RequestMessage:
    return RequestMessage(
        service=r.choice([t.SVC, t.SVC, "", "other.Svc", _text(r)]),
        method=r.choice(["Echo", "Echo", "", "Nope", _text(r)]),
        payload=r.choice(
            [KeyValue(key=_text(r), value=_text(r)).SerializeToString(), _bytes(r, 30)]
        ),
        timeout_nano=r.choice([0, -1, 1, 10**9, (1 << 63) - 1, r.randint(-(1 << 63), 1 << 62)]),
        metadata=tuple((_text(r, 8), _text(r, 8)) for _ in range(r.randint(0, 3))),
    )


def _response(r: random.Random) -> ResponseMessage:
    return ResponseMessage(
        code=r.choice([0, 0, 1, 5, 16, 17, -1, r.randint(-(1 << 31), (1 << 31) - 1)]),
        message=_text(r),
        payload=_bytes(r, 64),
    )


def gen_frame_decoder(r: random.Random) -> Any:
    return _stream(r)


def gen_envelopes(r: random.Random) -> Any:
    k = r.randint(0, 5)
    if k == 0:
        return ("request", _bytes(r, 120))
    if k == 1:
        return ("response", _bytes(r, 120))
    if k == 2:
        return ("request", _mutate(r, encode_request(_request(r))))
    if k == 3:
        return ("response", _mutate(r, encode_response(_response(r))))
    if k == 4:
        return ("req-rt", _request(r))
    return ("resp-rt", _response(r))


def gen_server_connection(r: random.Random) -> Any:
    def body() -> bytes:
        if r.random() < 0.2:
            return _bytes(r, 60)
        data = encode_request(_request(r))
        return _mutate(r, data) if r.random() < 0.2 else data

    plan = [r.choice(["finish", "fail", "defer", "nil"]) for _ in range(r.randint(1, 6))]
    return _stream(r, body), r.random() < 0.5, plan


def gen_client_connection(r: random.Random) -> Any:
    calls = r.randint(0, 6)
    abandon = [r.randint(0, max(calls - 1, 0)) for _ in range(r.randint(0, 3))]
    max_size = r.choice([64, 300, MAX_MESSAGE_SIZE])
    pieces = []
    for _ in range(r.randint(0, 8)):
        sid = 1 + 2 * r.randint(0, calls) if r.random() < 0.7 else _sid(r)
        body = _bytes(r, 60) if r.random() < 0.2 else encode_response(_response(r))
        if r.random() < 0.1:
            pieces.append(_piece(r, lambda b=body: b, max_size))  # type: ignore[misc]
        else:
            pieces.append(t._header(len(body), sid, r.choice([2, 2, 2, 1, 3, 200])) + body)
    raw = b"".join(pieces)
    cuts = [r.randint(0, max(len(raw), 1)) for _ in range(r.randint(0, 10))]
    return calls, max_size, abandon, raw, cuts


def _field(r: random.Random, field: pb_descriptor.FieldDescriptor, depth: int) -> Any:
    f = pb_descriptor.FieldDescriptor
    if field.type == f.TYPE_MESSAGE:
        if field.message_type is not None and field.message_type.full_name == "google.protobuf.Any":
            return {
                "type_url": r.choice(
                    ["", "containerd.runc.v1.Options", "x", t.EXEC_SPEC_URL, _text(r)]
                ),
                "value": r.choice(
                    [_bytes(r, 40), b"{}", b'{"args":["sh"],"cwd":"/"}', b"[]", b"null"]
                ),
            }
        assert field.message_type is not None
        return _message(r, field.message_type, depth + 1)
    likely = r.random() < 0.8
    if field.type == f.TYPE_STRING:
        if field.name == "id":
            return r.choice(t.ID_CHOICES) if likely else _text(r)
        if field.name == "exec_id":
            return r.choice(t.EXEC_CHOICES) if likely else _text(r)
        if field.name == "bundle":
            return r.choice(t._BUNDLE_HINTS) if likely else _text(r)
        return r.choice(["/dev/null", "file:///dev/null", "", _text(r)])
    if field.type == f.TYPE_BYTES:
        return _bytes(r, 32)
    if field.type == f.TYPE_BOOL:
        return r.random() < 0.5
    if field.type == f.TYPE_ENUM:
        return r.choice([v.number for v in field.enum_type.values] if field.enum_type else [0])
    if field.type in (f.TYPE_DOUBLE, f.TYPE_FLOAT):
        return r.uniform(-1e6, 1e6)
    if field.type in (f.TYPE_UINT32, f.TYPE_FIXED32):
        return r.randint(0, 40) if likely else r.randint(0, U32)
    if field.type in (f.TYPE_UINT64, f.TYPE_FIXED64):
        return r.randint(0, 40) if likely else r.randint(0, (1 << 64) - 1)
    if field.type in (f.TYPE_INT32, f.TYPE_SINT32, f.TYPE_SFIXED32):
        return r.randint(-2, 40) if likely else r.randint(-(1 << 31), (1 << 31) - 1)
    return r.randint(-2, 40) if likely else r.randint(-(1 << 63), (1 << 63) - 1)


def _message(r: random.Random, desc: Any, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if depth > 3:
        return out
    for field in desc.fields:
        if r.random() < 0.25:
            continue
        if field.is_repeated:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                continue
            out[field.name] = [_field(r, field, depth) for _ in range(r.randint(0, 2))]
        else:
            out[field.name] = _field(r, field, depth)
    return out


def gen_task_service(r: random.Random) -> Any:
    from shim.task.service import SERVICE_NAMES

    method = r.choice(sorted(t.METHODS))
    service = r.choice(SERVICE_NAMES)
    if r.random() < 0.25:
        return service, method, _bytes(r, 80)
    req_type: type[Message] = t.METHODS[method]
    msg = req_type()
    try:
        t.fill(msg, _message(r, req_type.DESCRIPTOR, 0))
    except (ValueError, TypeError):
        return service, method, _bytes(r, 80)
    payload = msg.SerializeToString()
    return service, method, _mutate(r, payload) if r.random() < 0.1 else payload


GENERATORS: Final[dict[str, Callable[[random.Random], Any]]] = {
    "frame_decoder": gen_frame_decoder,
    "envelopes": gen_envelopes,
    "server_connection": gen_server_connection,
    "client_connection": gen_client_connection,
    "task_service": gen_task_service,
}
