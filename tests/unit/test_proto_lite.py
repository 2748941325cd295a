"""The CLI's LiteMessages against manager.proto's generated classes: same fields (names,
numbers, kinds), same bytes both ways, same `--json` (to_dict against MessageToDict);
and the ttrpc envelope written out by hand against ttrpc.proto's classes."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from google.protobuf import empty_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError, Message

from protocol.proto import lite as litebase
from protocol.proto import ttrpc_pb2
from protocol.proto.lite import LiteMessage
from protocol.proto.manager.v1 import manager_lite, manager_pb2
from protocol.ttrpc.messages import (
    RequestMessage,
    ResponseMessage,
    decode_response,
    encode_request,
    encode_response,
)

F = FieldDescriptor
_KINDS = {
    "str": {F.TYPE_STRING},
    "bytes": {F.TYPE_BYTES},
    # JSON writes 64-bit integers as strings: the lite kind must say which they are.
    "int": {F.TYPE_INT32, F.TYPE_UINT32},
    "int64": {F.TYPE_INT64},
    "uint64": {F.TYPE_UINT64},
    "bool": {F.TYPE_BOOL},
    "float": {F.TYPE_DOUBLE},
    "message": {F.TYPE_MESSAGE},
}
PAIRS: list[tuple[type[LiteMessage], type[Message]]] = [
    (litebase.Empty, empty_pb2.Empty),
    (litebase.Timestamp, timestamp_pb2.Timestamp),
] + [
    (getattr(manager_lite, n), getattr(manager_pb2, n))
    for n in manager_lite.__all__
    if n not in ("Empty", "Timestamp")  # google.protobuf's, above
]


def _is_repeated(f: Any) -> bool:
    return bool(f.is_repeated)  # protobuf 7's FieldDescriptor (no more `label`)


@pytest.mark.parametrize(("lite", "gen"), PAIRS, ids=lambda c: c.__name__)
def test_lite_declares_every_field_as_the_proto_does(
    lite: type[LiteMessage], gen: type[Message]
) -> None:
    desc: Any = gen.DESCRIPTOR
    assert lite.__name__ == desc.name
    declared = {f.name: f for f in lite.FIELDS}
    assert set(declared) == set(desc.fields_by_name), "update manager_lite with the proto"
    for name, f in declared.items():
        want = desc.fields_by_name[name]
        assert f.number == want.number, name
        assert want.type in _KINDS[f.kind], (name, f.kind, want.type)
        assert f.repeated == _is_repeated(want), name
        if f.message is not None:
            assert f.message.__name__ == want.message_type.name, name


def _filled(gen: type[Message], depth: int = 0, *, every: int = 1, first: int = 0) -> Message:
    """Every field set to something other than its default (repeated ones twice); with
    ``every``/``first``, only every ``every``-th field from the ``first``."""
    msg = gen()
    if gen is timestamp_pb2.Timestamp:  # a valid one: JSON refuses others
        msg = gen(seconds=1765051200 + depth, nanos=[5, 120_000_000, 7_000][depth % 3])
        return msg
    fields: Any = gen.DESCRIPTOR.fields
    for f in list(fields)[first::every]:
        values: list[object]
        if f.type == F.TYPE_MESSAGE:
            sub = type(getattr(msg, f.name)) if not _is_repeated(f) else None
            cls = sub or getattr(msg, f.name).add().__class__
            if _is_repeated(f):
                del getattr(msg, f.name)[:]
            values = [_filled(cls, depth + 1), _filled(cls, depth + 1)]
        elif f.type == F.TYPE_STRING:
            values = [f"{f.name}-é", "two"]
        elif f.type == F.TYPE_BYTES:
            values = [b"\x00\xff", b"b"]
        elif f.type == F.TYPE_BOOL:
            values = [True, True]
        elif f.type == F.TYPE_DOUBLE:
            values = [0.25, 1.5]
        elif f.type == F.TYPE_UINT32:
            values = [2**32 - 1 - f.number, 3]
        elif f.type == F.TYPE_UINT64:  # above 2**63: no sign
            values = [2**64 - 1 - f.number, 3]
        else:  # int32/int64: a negative one tests the ten-byte varint
            values = [-(f.number + 1), 7]
        if _is_repeated(f):
            getattr(msg, f.name).extend(values)
        elif f.type == F.TYPE_MESSAGE:
            getattr(msg, f.name).CopyFrom(values[0])
        else:
            setattr(msg, f.name, values[0])
    return msg


@pytest.mark.parametrize(("lite", "gen"), PAIRS, ids=lambda c: c.__name__)
def test_same_bytes_both_ways(lite: type[LiteMessage], gen: type[Message]) -> None:
    for msg in (gen(), _filled(gen)):
        data = msg.SerializeToString()
        decoded = lite.FromString(data)
        assert decoded.SerializeToString() == data
        assert gen.FromString(decoded.SerializeToString()) == msg


def _variants(gen: type[Message]) -> list[Message]:
    """Empty, full, and half set (either half): which fields are set orders the JSON."""
    return [gen(), _filled(gen), _filled(gen, every=2), _filled(gen, every=2, first=1)]


def _message_json(msg: Message) -> str:
    """What the CLI printed for `--json` before it had LiteMessages."""
    d = MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return json.dumps(d, indent=2)


@pytest.mark.parametrize(
    ("lite", "gen"), [p for p in PAIRS if p[0] is not litebase.Timestamp], ids=lambda c: c.__name__
)
def test_to_dict_is_message_to_dict(lite: type[LiteMessage], gen: type[Message]) -> None:
    for msg in _variants(gen):
        data = msg.SerializeToString()
        assert json.dumps(litebase.to_dict(lite.FromString(data)), indent=2) == _message_json(msg)


def test_a_present_empty_message_is_kept_as_protobuf_keeps_it() -> None:
    """exited_at sent at the epoch (empty on the wire, but there) is printed, and
    written again; one never given is neither."""
    gen = manager_pb2.Container(id="x")
    gen.exited_at.SetInParent()
    got = manager_lite.Container.FromString(gen.SerializeToString())
    assert got.HasField("exited_at") and not got.HasField("started_at")
    assert got.SerializeToString() == gen.SerializeToString()
    assert json.dumps(litebase.to_dict(got), indent=2) == _message_json(gen)
    made = manager_lite.Container(id="x", exited_at=litebase.Timestamp())
    assert made.SerializeToString() == gen.SerializeToString()


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [
        (0, 0),
        (-62135596800, 0),  # Go's zero time, the earliest protobuf takes
        (253402300799, 999_999_999),
        (-1, 500_000_000),
        (1765051200, 1_000),
        (1765051200, 123_456_789),
        (951782400, 10_000_000),  # 2000-02-29
    ],
)
def test_timestamp_text_is_protobufs(seconds: int, nanos: int) -> None:
    want = timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos).ToJsonString()
    assert litebase.timestamp_text(litebase.Timestamp(seconds=seconds, nanos=nanos)) == want


@pytest.mark.parametrize(("seconds", "nanos"), [(-62135596801, 0), (0, -1), (0, 10**9)])
def test_timestamp_text_refuses_what_protobuf_refuses(seconds: int, nanos: int) -> None:
    with pytest.raises(ValueError):
        timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos).ToJsonString()
    with pytest.raises(ValueError):
        litebase.timestamp_text(litebase.Timestamp(seconds=seconds, nanos=nanos))


def test_unknown_fields_are_skipped_and_defaults_read() -> None:
    # A Container read as a KillRequest: 1-2 are text in both, 3 is text where signal
    # is a number (another wire type: unknown), 4 a number in both, 5-26 unknown.
    full = _filled(manager_pb2.Container).SerializeToString()
    want = manager_pb2.KillRequest.FromString(full)
    got = manager_lite.KillRequest.FromString(full)
    assert (got.container, got.exec_id, got.signal, got.all) == (
        want.container,
        want.exec_id,
        want.signal,
        want.all,
    )
    empty = manager_lite.Container()
    assert (empty.id, empty.pid, empty.exited, empty.command) == ("", 0, False, [])
    assert empty.exited_at == litebase.Timestamp()


@pytest.mark.parametrize("data", [b"\xff", b"\x0a\x05ab", b"\x0a\x02\xff\xfe"])
def test_undecodable_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        manager_lite.Container.FromString(data)
    with pytest.raises(DecodeError):
        manager_pb2.Container.FromString(data)


def test_a_field_of_another_wire_type_is_unknown_as_in_protobuf() -> None:
    data = b"\x08\x01\x20\x07"  # id (text) as a varint, then pid = 7
    assert manager_pb2.Container.FromString(data).id == ""
    assert (
        manager_lite.Container.FromString(data).id,
        manager_lite.Container.FromString(data).pid,
    ) == ("", 7)


def test_unknown_keyword_is_refused() -> None:
    with pytest.raises(TypeError, match="no field"):
        manager_lite.WaitRequest(containr="x")


@pytest.mark.parametrize(
    "req",
    [
        RequestMessage("s", "m"),
        RequestMessage("a.B", "C", b"\x01\x00", -5, (("k", "1"), ("k", "2"), ("", ""))),
        RequestMessage("x", "y", b"", 2_000_000_000, (("é", "ü"),)),
    ],
)
def test_request_envelope_bytes_are_protobufs(req: RequestMessage) -> None:
    want = ttrpc_pb2.Request(
        service=req.service,
        method=req.method,
        payload=req.payload,
        timeout_nano=req.timeout_nano,
        metadata=[ttrpc_pb2.KeyValue(key=k, value=v) for k, v in req.metadata],
    )
    assert encode_request(req) == want.SerializeToString()


@pytest.mark.parametrize(
    "resp",
    [
        ResponseMessage(),
        ResponseMessage(payload=b"\x08\x01"),
        ResponseMessage(code=5, message="gone"),
        ResponseMessage(code=-3, message="négatif"),
    ],
)
def test_response_envelope_bytes_are_protobufs(resp: ResponseMessage) -> None:
    want = ttrpc_pb2.Response(payload=resp.payload)
    if resp.code:
        want = ttrpc_pb2.Response()
        want.status.code = resp.code
        want.status.message = resp.message
    assert encode_response(resp) == want.SerializeToString()
    assert decode_response(want.SerializeToString()) == resp


def test_response_status_fields_merge_as_protobuf_does() -> None:
    first = ttrpc_pb2.Response()
    first.status.code = 5
    first.status.message = "a"
    second = ttrpc_pb2.Response()
    second.status.message = "b"
    data = first.SerializeToString() + second.SerializeToString()
    want = ttrpc_pb2.Response.FromString(data)
    assert decode_response(data) == ResponseMessage(code=want.status.code, message="b")


def test_lite_messages_import_no_protobuf_runtime() -> None:
    """Their reason to exist: only google.protobuf.message (for DecodeError) loads."""
    code = (
        "import sys\n"
        "from protocol.proto.manager.v1 import manager_lite\n"
        "from protocol.ttrpc import blocking\n"
        "print(sorted(m for m in sys.modules if m.startswith('google.protobuf.')"
        " or m.endswith('_pb2')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['google.protobuf.message']"
