"""Fuzz targets: a hypothesis strategy and a check for each piece that reads peer bytes.

A check raises (AssertionError or the escaping exception) on a finding; anything else
is a pass. Checks never touch sockets; the task-service target runs the real
``TaskService`` behind the real ``ServerConnection`` with a fake runtime and IO.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple

from google.protobuf import descriptor as pb_descriptor
from google.protobuf.message import Message
from hypothesis import assume
from hypothesis import strategies as st

from protocol.proto.task.v2 import shim_pb2
from protocol.proto.ttrpc_pb2 import KeyValue
from protocol.ttrpc.connection import (
    CallCompleted,
    CallFailed,
    CallReceived,
    ClientConnection,
    ErrorReply,
    FrameIgnored,
    LateResponse,
    ServerConnection,
    UnknownStream,
)
from protocol.ttrpc.frame import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    Frame,
    FrameDecoder,
    MessageType,
    OversizedFrame,
    TruncatedFrameError,
    oversize_message,
)
from protocol.ttrpc.messages import (
    MessageDecodeError,
    RequestMessage,
    ResponseMessage,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from protocol.ttrpc.server import Method, RequestContext
from protocol.ttrpc.status import Code, TtrpcError

_HEADER: Final = struct.Struct(">IIBB")
U32: Final = 0xFFFF_FFFF

# ------------------------------------------------------------------ shared helpers


def _header(length: int, sid: int, type_: int, flags: int = 0) -> bytes:
    return _HEADER.pack(length, sid, type_, flags)


def oracle_events(data: bytes, max_size: int) -> list[Frame | OversizedFrame]:
    """Reference decoder for a whole stream: the complete events, in order."""
    out: list[Frame | OversizedFrame] = []
    off = 0
    while len(data) - off >= HEADER_SIZE:
        length, sid, type_, flags = _HEADER.unpack_from(data, off)
        end = off + HEADER_SIZE + length
        if end > len(data):
            break
        if length > max_size:
            out.append(OversizedFrame(sid, type_, flags, length, max_size))
        else:
            out.append(Frame(sid, type_, flags, bytes(data[off + HEADER_SIZE : end])))
        off = end
    return out


def split(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    """``data`` in pieces at the (clamped, sorted) ``cuts``; empty pieces included."""
    points = sorted(min(max(c, 0), len(data)) for c in cuts)
    prev = 0
    for p in [*points, len(data)]:
        yield data[prev:p]
        prev = p


def parse_one_frame(data: bytes) -> Frame:
    """The single whole frame ``data`` must be (used on bytes we are about to send)."""
    assert len(data) >= HEADER_SIZE, data
    length, sid, type_, flags = _HEADER.unpack_from(data)
    assert len(data) == HEADER_SIZE + length, (len(data), length)
    return Frame(sid, type_, flags, data[HEADER_SIZE:])


def check_status_frame(data: bytes, sid: int, code: int, limit: int) -> ResponseMessage:
    frame = parse_one_frame(data)
    assert frame.stream_id == sid and frame.type == MessageType.RESPONSE and frame.flags == 0
    assert len(frame.data) <= limit
    resp = decode_response(frame.data)
    assert resp.code == code != 0, (resp, code)
    assert resp.payload == b""
    return resp


small_text = st.text(max_size=24)
sids = st.one_of(st.integers(0, 12), st.sampled_from([U32, U32 - 1, 1 << 31]), st.integers(0, U32))
frame_types = st.one_of(st.sampled_from([1, 1, 1, 2, 3]), st.integers(0, 255))
flag_bytes = st.one_of(st.just(0), st.integers(0, 255))
max_sizes = st.sampled_from([0, 1, 10, 64, 300, MAX_MESSAGE_SIZE])


@st.composite
def frame_piece(draw: st.DrawFn, data: st.SearchStrategy[bytes], max_size: int) -> bytes:
    """A header and its data (well-formed), a lying header, or loose bytes."""
    kind = draw(st.sampled_from(["frame", "frame", "frame", "oversize", "liar", "junk"]))
    if kind == "junk":
        return draw(st.binary(max_size=40))
    sid, type_, flags = draw(sids), draw(frame_types), draw(flag_bytes)
    if kind == "oversize":
        if max_size >= 1 << 16:
            # Only the header: the data of a real oversize frame would be megabytes.
            length = draw(st.sampled_from([max_size + 1, U32, max_size * 2]))
            return _header(length, sid, type_, flags)
        length = draw(st.integers(max_size + 1, max_size + 80))
        return _header(length, sid, type_, flags) + draw(
            st.binary(min_size=length, max_size=length)
        )
    body = draw(data)
    if kind == "liar":
        length = draw(st.integers(0, len(body) + 20))
        return _header(length, sid, type_, flags) + body
    return _header(len(body), sid, type_, flags) + body


@st.composite
def byte_stream(
    draw: st.DrawFn, data: st.SearchStrategy[bytes] | None = None
) -> tuple[int, bytes, list[int]]:
    max_size = draw(max_sizes)
    body = st.binary(max_size=60) if data is None else data
    pieces = draw(st.lists(frame_piece(body, max_size), max_size=8))
    raw = b"".join(pieces)
    if draw(st.booleans()):
        raw = draw(st.binary(max_size=200)) + raw
    cuts = draw(st.lists(st.integers(0, max(len(raw), 1)), max_size=12))
    return max_size, raw, cuts


# ------------------------------------------------------------------ frame decoder


def check_frame_decoder(case: tuple[int, bytes, list[int]]) -> None:
    max_size, raw, cuts = case
    dec = FrameDecoder(max_size)
    got: list[Frame | OversizedFrame] = []
    for piece in split(raw, cuts):
        dec.feed(piece)
        got.extend(dec.events())
        # Never holds a whole frame it has not handed out, nor any oversize data.
        pending_len = struct.unpack_from(">I", dec._buf)[0] if dec.buffered >= 4 else 0
        if dec._discarding is None and dec.buffered >= HEADER_SIZE:
            assert dec.buffered < HEADER_SIZE + pending_len, (dec.buffered, pending_len)
            assert pending_len <= max_size
    assert got == oracle_events(raw, max_size)
    boundary = dec.at_boundary
    try:
        dec.close()
    except TruncatedFrameError:
        assert not boundary
    else:
        assert boundary
    # A closed decoder still hands out nothing new.
    assert dec.next_event() is None


# ------------------------------------------------------------------ envelopes


def check_decode_request(data: bytes) -> None:
    try:
        req = decode_request(data)
    except MessageDecodeError as exc:
        assert str(exc)
        return
    again = decode_request(encode_request(req))
    assert again == req, (again, req)


def check_decode_response(data: bytes) -> None:
    try:
        resp = decode_response(data)
    except MessageDecodeError as exc:
        assert str(exc)
        return
    assert resp.code == 0 or resp.payload == b""
    assert decode_response(encode_response(resp)) == resp


request_messages = st.builds(
    RequestMessage,
    service=small_text,
    method=small_text,
    payload=st.binary(max_size=64),
    timeout_nano=st.integers(-(1 << 63), (1 << 63) - 1),
    metadata=st.lists(st.tuples(small_text, small_text), max_size=4).map(tuple),
)
response_messages = st.builds(
    ResponseMessage,
    code=st.integers(-(1 << 31), (1 << 31) - 1),
    message=small_text,
    payload=st.binary(max_size=64),
)


def check_request_roundtrip(req: RequestMessage) -> None:
    assert decode_request(encode_request(req)) == req


def check_response_roundtrip(resp: ResponseMessage) -> None:
    got = decode_response(encode_response(resp))
    if resp.code == 0:
        assert got == ResponseMessage(payload=resp.payload)
    else:
        assert got == ResponseMessage(code=resp.code, message=resp.message)


envelope_cases = st.one_of(
    st.binary(max_size=120).map(lambda b: ("request", b)),
    st.binary(max_size=120).map(lambda b: ("response", b)),
    request_messages.map(lambda r: ("request", encode_request(r))),
    response_messages.map(lambda r: ("response", encode_response(r))),
    request_messages.map(lambda r: ("req-rt", r)),
    response_messages.map(lambda r: ("resp-rt", r)),
)


def check_envelopes(case: tuple[str, Any]) -> None:
    kind, value = case
    if kind == "request":
        check_decode_request(value)
    elif kind == "response":
        check_decode_response(value)
    elif kind == "req-rt":
        check_request_roundtrip(value)
    else:
        check_response_roundtrip(value)


# ------------------------------------------------------------------ server connection

SVC: Final = "fuzz.Svc"


async def _echo(ctx: RequestContext, req: KeyValue) -> KeyValue:
    return req


SERVICES: Final[dict[str, dict[str, Method[Any, Any]]]] = {
    SVC: {"Echo": Method(KeyValue, _echo)},
}


@st.composite
def request_data(draw: st.DrawFn) -> bytes:
    """Frame data that is mostly a plausible Request envelope."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=60))
    payload = draw(
        st.one_of(
            st.builds(KeyValue, key=small_text, value=small_text).map(
                lambda kv: kv.SerializeToString()
            ),
            st.binary(max_size=30),
        )
    )
    req = RequestMessage(
        service=draw(st.sampled_from([SVC, SVC, "", "other.Svc"])),
        method=draw(st.sampled_from(["Echo", "Echo", "", "Nope"])),
        payload=payload,
        timeout_nano=draw(st.sampled_from([0, -1, 1, 10**9, (1 << 63) - 1])),
        metadata=tuple(draw(st.lists(st.tuples(small_text, small_text), max_size=3))),
    )
    return encode_request(req)


server_cases = st.tuples(
    byte_stream(request_data()),
    st.booleans(),
    st.lists(st.sampled_from(["finish", "fail", "defer", "nil"]), min_size=1, max_size=6),
)


def check_server_connection(
    case: tuple[tuple[int, bytes, list[int]], bool, list[str]],
) -> None:
    (max_size, raw, cuts), strict, plan = case
    # Below this not even a bare status fits a frame (true of Go ttrpc too).
    max_size = max(max_size, 64)
    sm: ServerConnection[Method[Any, Any]] = ServerConnection(
        SERVICES, strict_stream_ids=strict, max_message_size=max_size
    )
    expected = oracle_events(raw, max_size)
    seen: list[int] = []
    deferred: list[CallReceived[Method[Any, Any]]] = []
    step = 0

    def answer(call: CallReceived[Method[Any, Any]], how: str) -> None:
        if how == "fail":
            out = sm.fail_call(call.stream_id, Code.NOT_FOUND, "nope")
            assert out is not None
            check_status_frame(out, call.stream_id, Code.NOT_FOUND, max_size)
            return
        out = sm.finish_call(call.stream_id, None if how == "nil" else call.request)
        assert out is not None
        frame = parse_one_frame(out)
        assert frame.stream_id == call.stream_id and frame.type == MessageType.RESPONSE
        assert len(frame.data) <= max_size
        resp = decode_response(frame.data)
        if how == "nil":
            assert resp.code == Code.UNKNOWN
        elif resp.code == 0:
            assert KeyValue.FromString(resp.payload) == call.request
        else:
            assert resp.code == Code.RESOURCE_EXHAUSTED

    for piece in split(raw, cuts):
        sm.receive_data(piece)
        while (ev := sm.next_event()) is not None:
            src = expected[len(seen)]
            seen.append(ev.stream_id)
            assert ev.stream_id == src.stream_id
            if isinstance(src, OversizedFrame):
                assert isinstance(ev, ErrorReply) and ev.code == Code.RESOURCE_EXHAUSTED
                assert ev.message == oversize_message(src.length, max_size)
            if isinstance(ev, ErrorReply):
                assert ev.code != Code.OK
                check_status_frame(ev.data, ev.stream_id, ev.code, max_size)
            elif isinstance(ev, FrameIgnored):
                assert isinstance(src, Frame) and src.type != MessageType.REQUEST
            else:
                assert isinstance(src, Frame) and src.type == MessageType.REQUEST
                assert ev.stream_id % 2 == 1
                how = plan[step % len(plan)]
                step += 1
                if how == "defer":
                    deferred.append(ev)
                else:
                    answer(ev, how)
            assert sm.in_flight == len(deferred)
    assert len(seen) == len(expected)
    # Half of the deferred calls finish while connected, the rest after the peer left.
    for call in deferred[: len(deferred) // 2]:
        answer(call, "finish")
    sm.receive_eof()
    sm.receive_data(b"\0" * 20)
    assert sm.next_event() is None
    for call in deferred[len(deferred) // 2 :]:
        assert sm.finish_call(call.stream_id, call.request) is None
    assert sm.in_flight == 0


# ------------------------------------------------------------------ client connection


@st.composite
def response_data(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=60))
    return encode_response(draw(response_messages))


@st.composite
def client_cases(draw: st.DrawFn) -> tuple[int, int, list[int], bytes, list[int]]:
    calls = draw(st.integers(0, 6))
    abandon = draw(st.lists(st.integers(0, max(calls - 1, 0)), max_size=3))
    max_size = draw(st.sampled_from([64, 300, MAX_MESSAGE_SIZE]))
    own = st.sampled_from([1 + 2 * i for i in range(max(calls, 1) + 1)])
    pieces = []
    for _ in range(draw(st.integers(0, 8))):
        sid = draw(st.one_of(own, own, sids))
        type_ = draw(st.sampled_from([2, 2, 2, 1, 3, 200]))
        body = draw(response_data())
        if draw(st.integers(0, 9)) == 0:
            pieces.append(draw(frame_piece(st.just(body), max_size)))
        else:
            pieces.append(_header(len(body), sid, type_) + body)
    raw = b"".join(pieces)
    cuts = draw(st.lists(st.integers(0, max(len(raw), 1)), max_size=10))
    return calls, max_size, abandon, raw, cuts


def check_client_connection(case: tuple[int, int, list[int], bytes, list[int]]) -> None:
    calls, max_size, abandon, raw, cuts = case
    cc = ClientConnection(max_message_size=max_size)
    ids = []
    for _ in range(calls):
        sid, data = cc.send_request(SVC, "Echo", b"")
        ids.append(sid)
        assert parse_one_frame(data).stream_id == sid
    assert ids == [1 + 2 * i for i in range(calls)]
    abandoned = {ids[i] for i in abandon if i < len(ids)}
    for sid in abandoned:
        cc.abandon(sid)
    pending = set(ids) - abandoned
    done: set[int] = set()
    for piece in split(raw, cuts):
        cc.receive_data(piece)
        while (ev := cc.next_event()) is not None:
            if isinstance(ev, (CallCompleted, CallFailed)):
                assert ev.stream_id in pending and ev.stream_id not in done
                done.add(ev.stream_id)
                if isinstance(ev, CallFailed):
                    assert isinstance(ev.error, TtrpcError) and int(ev.error.code) != 0
            elif isinstance(ev, LateResponse):
                assert ev.stream_id in abandoned
                abandoned.discard(ev.stream_id)
            else:
                assert isinstance(ev, UnknownStream)
                assert ev.stream_id not in pending - done
    assert cc.pending == frozenset(pending - done)
    assert cc.close() == sorted(pending - done)
    assert cc.close() == []


# ------------------------------------------------------------------ task service

EXEC_SPEC_URL: Final = "types.containerd.io/opencontainers/runtime-spec/1/Process"
ID_CHOICES: Final = ["c1", "c1", "e1", "", "c2", "x" * 77, "../c1", "c1/..", "C1\n"]
EXEC_CHOICES: Final = ["", "", "e1", "e2", "c1", "../e1", "e1/x"]


def _mostly(likely: st.SearchStrategy[Any], rest: st.SearchStrategy[Any]) -> Any:
    return st.integers(0, 4).flatmap(lambda n: rest if n == 0 else likely)


def _field_value(
    draw: st.DrawFn, field: pb_descriptor.FieldDescriptor, depth: int, bundles: list[str]
) -> Any:
    t = pb_descriptor.FieldDescriptor
    if field.type == t.TYPE_MESSAGE:
        if field.message_type is not None and field.message_type.full_name == "google.protobuf.Any":
            return {
                "type_url": draw(
                    st.sampled_from(
                        [
                            "",
                            "containerd.runc.v1.Options",
                            EXEC_SPEC_URL,
                            "x",
                        ]
                    )
                ),
                "value": draw(
                    st.one_of(
                        st.binary(max_size=40),
                        st.sampled_from([b"{}", b'{"args":["sh"],"cwd":"/"}', b"[]", b"null"]),
                    )
                ),
            }
        assert field.message_type is not None
        return _message_dict(draw, field.message_type, depth + 1, bundles)
    if field.type == t.TYPE_STRING:
        if field.name == "id":
            return draw(_mostly(st.sampled_from(ID_CHOICES), small_text))
        if field.name == "exec_id":
            return draw(_mostly(st.sampled_from(EXEC_CHOICES), small_text))
        if field.name == "bundle":
            return draw(_mostly(st.sampled_from(bundles), small_text))
        return draw(st.one_of(small_text, st.sampled_from(["/dev/null", "file:///dev/null", ""])))
    if field.type == t.TYPE_BYTES:
        return draw(st.binary(max_size=32))
    if field.type == t.TYPE_BOOL:
        return draw(st.booleans())
    if field.type == t.TYPE_ENUM:
        return draw(
            st.sampled_from([v.number for v in field.enum_type.values] if field.enum_type else [0])
        )
    if field.type in (t.TYPE_DOUBLE, t.TYPE_FLOAT):
        return draw(st.floats(allow_nan=False, width=32))
    if field.type in (t.TYPE_UINT32, t.TYPE_FIXED32):
        return draw(st.one_of(st.integers(0, 40), st.integers(0, U32)))
    if field.type in (t.TYPE_UINT64, t.TYPE_FIXED64):
        return draw(st.one_of(st.integers(0, 40), st.integers(0, (1 << 64) - 1)))
    if field.type in (t.TYPE_INT32, t.TYPE_SINT32, t.TYPE_SFIXED32):
        return draw(st.one_of(st.integers(-2, 40), st.integers(-(1 << 31), (1 << 31) - 1)))
    return draw(st.one_of(st.integers(-2, 40), st.integers(-(1 << 63), (1 << 63) - 1)))


def _message_dict(draw: st.DrawFn, desc: Any, depth: int, bundles: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if depth > 3:
        return out
    for field in desc.fields:
        if draw(st.integers(0, 3)) == 0:
            continue
        if field.is_repeated:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                continue
            n = draw(st.integers(0, 2))
            out[field.name] = [_field_value(draw, field, depth, bundles) for _ in range(n)]
        else:
            out[field.name] = _field_value(draw, field, depth, bundles)
    return out


# Filled in by the ServiceFuzzer: (bundle paths the strategy may pick).
_BUNDLE_HINTS: list[str] = ["/nonexistent-bundle", "relative", ""]


@st.composite
def service_cases(draw: st.DrawFn) -> tuple[str, str, bytes]:
    from shim.task.service import SERVICE_NAMES

    method = draw(st.sampled_from(sorted(METHODS)))
    service = draw(st.sampled_from(SERVICE_NAMES))
    if draw(st.integers(0, 3)) == 0:
        payload = draw(st.binary(max_size=80))
    else:
        req_type = METHODS[method]
        msg = req_type()
        fields = _message_dict(draw, req_type.DESCRIPTOR, 0, _BUNDLE_HINTS)
        try:
            fill(msg, fields)
        except (ValueError, TypeError):
            assume(False)
        payload = msg.SerializeToString()
    return service, method, payload


def fill(msg: Message, fields: dict[str, Any]) -> None:
    for name, value in fields.items():
        field = msg.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name)
        if field.type == pb_descriptor.FieldDescriptor.TYPE_MESSAGE:
            if isinstance(value, list):
                for item in value:
                    fill(target.add(), item)
            else:
                target.SetInParent()
                fill(target, value)
        elif isinstance(value, list):
            target.extend(value)
        else:
            setattr(msg, name, value)


METHODS: Final[dict[str, type[Message]]] = {
    "State": shim_pb2.StateRequest,
    "Create": shim_pb2.CreateTaskRequest,
    "Start": shim_pb2.StartRequest,
    "Delete": shim_pb2.DeleteRequest,
    "Pids": shim_pb2.PidsRequest,
    "Pause": shim_pb2.PauseRequest,
    "Resume": shim_pb2.ResumeRequest,
    "Checkpoint": shim_pb2.CheckpointTaskRequest,
    "Kill": shim_pb2.KillRequest,
    "Exec": shim_pb2.ExecProcessRequest,
    "ResizePty": shim_pb2.ResizePtyRequest,
    "CloseIO": shim_pb2.CloseIORequest,
    "Update": shim_pb2.UpdateTaskRequest,
    "Wait": shim_pb2.WaitRequest,
    "Stats": shim_pb2.StatsRequest,
    "Connect": shim_pb2.ConnectRequest,
    "Shutdown": shim_pb2.ShutdownRequest,
}

# A handler answering later than this (except a Wait on a live process) is a hang.
CALL_BUDGET: Final = 2.0


@dataclass
class _World:
    harness: Any  # tests.unit.shim.task.test_service.Harness
    baseline: tuple[Any, ...]


class ServiceFuzzer:
    """The real TaskService (fake runc/IO/mounts) behind a real ServerConnection, with
    container ``c1`` running and exec ``e1`` created, rebuilt whenever a call changed it."""

    def __init__(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="pyshim-fuzz-"))
        self._runner = asyncio.Runner()
        self._generation = 0
        self._world: _World | None = None
        self.cases = 0
        self.skipped = 0
        _BUNDLE_HINTS[:] = [
            "/nonexistent-bundle",
            "relative",
            "",
            str(self._tmp),  # exists, no config.json
        ]

    def close(self) -> None:
        if self._world is not None:
            self._world.harness.service.close()
        self._runner.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> ServiceFuzzer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _snapshot(self) -> tuple[Any, ...]:
        assert self._world is not None
        h = self._world.harness
        conts = h.service._containers
        return (
            tuple(
                (
                    cid,
                    c.init.status,
                    c.init.pid,
                    tuple(sorted((eid, e.status, e.pid) for eid, e in c.execs.items())),
                )
                for cid, c in sorted(conts.items())
            ),
            len(h.publisher.events),
            len(h.shutdowns),
            tuple(h.shared.names()),
        )

    def _rebuild(self) -> None:
        from tests.unit.shim.task.test_service import make_harness

        if self._world is not None:
            self._world.harness.service.close()
        self._generation += 1
        root = self._tmp / f"g{self._generation}"
        old = self._tmp / f"g{self._generation - 1}"
        shutil.rmtree(old, ignore_errors=True)
        root.mkdir()
        h = make_harness(root)

        async def setup() -> None:
            await h.run("c1")
            await h.exec("c1", "e1")

        self._runner.run(setup())
        fresh = h.bundle("b2")
        _BUNDLE_HINTS[4:] = [fresh, str(root / "b1")]
        self._world = _World(h, ())
        self._world.baseline = self._snapshot()

    def check(self, case: tuple[str, str, bytes]) -> None:
        service, method, payload = case
        self.cases += 1
        if self._world is None:
            self._rebuild()
        assert self._world is not None
        h = self._world.harness
        before = self._snapshot()

        class _Collect:
            services: dict[str, dict[str, Method[Any, Any]]] = {}

            def register(self, name: str, methods: dict[str, Method[Any, Any]]) -> None:
                self.services[name] = methods

        collect = _Collect()
        collect.services = {}
        h.service.register(collect)
        sm: ServerConnection[Method[Any, Any]] = ServerConnection(collect.services)
        sm.receive_data(
            _frame_request(RequestMessage(service=service, method=method, payload=payload))
        )
        ev = sm.next_event()
        assert ev is not None and sm.next_event() is None
        if isinstance(ev, ErrorReply):
            assert ev.code == Code.INTERNAL, ev
            assert self._snapshot() == before
            return
        assert isinstance(ev, CallReceived), ev
        if method == "Create":
            bundle = getattr(ev.request, "bundle", "")
            # Never let a fuzzed Create write into a real directory on this machine.
            real = os.path.realpath(bundle.replace("\0", ""))
            inside = real.startswith(str(self._tmp) + os.sep)
            if os.path.isabs(bundle) and os.path.exists(real) and not inside:
                self.skipped += 1
                return
        code, out = self._runner.run(self._call(sm, ev, method))
        frame = out and parse_one_frame(out)
        assert frame and frame.stream_id == 1
        resp = decode_response(frame.data)
        assert resp.code == code
        after = self._snapshot()
        if code != 0:
            assert after == before, (method, ev.request, code, resp.message)
        if after != self._world.baseline:
            self._rebuild()

    async def _call(
        self,
        sm: ServerConnection[Method[Any, Any]],
        ev: CallReceived[Method[Any, Any]],
        method: str,
    ) -> tuple[int, bytes | None]:
        assert self._world is not None
        h = self._world.harness
        ctx = RequestContext(ev.service, ev.method_name, ev.metadata, None, ev.stream_id)
        budget = CALL_BUDGET
        waits_forever = False
        if method == "Wait":
            try:
                wait_req = ev.request
                assert isinstance(wait_req, shim_pb2.WaitRequest)
                p = h.service._process(wait_req.id, wait_req.exec_id)
                waits_forever = not p.has_exited
            except TtrpcError:
                pass
            if waits_forever:
                budget = 0.02
        try:
            async with asyncio.timeout(budget):
                result = await ev.method.handler(ctx, ev.request)
        except TtrpcError as exc:
            assert int(exc.code) != 0
            return int(exc.code), sm.fail_call(1, exc.code, exc.message)
        except TimeoutError:
            assert waits_forever, f"{method} did not answer in {budget}s: {ev.request}"
            return Code.DEADLINE_EXCEEDED, sm.fail_call(1, Code.DEADLINE_EXCEEDED, "deadline")
        return 0, sm.finish_call(1, result)


def _frame_request(req: RequestMessage) -> bytes:
    data = encode_request(req)
    return _header(len(data), 1, MessageType.REQUEST) + data


# ------------------------------------------------------------------ registry


class Target(NamedTuple):
    strategy: st.SearchStrategy[Any]
    # Builds the check; the context manager (if any) owns resources for a run.
    check: Callable[[Any], None] | None
    stateful: bool = False


TARGETS: Final[dict[str, Target]] = {
    "frame_decoder": Target(byte_stream(), check_frame_decoder),
    "envelopes": Target(envelope_cases, check_envelopes),
    "server_connection": Target(server_cases, check_server_connection),
    "client_connection": Target(client_cases(), check_client_connection),
    "task_service": Target(service_cases(), None, stateful=True),
}
