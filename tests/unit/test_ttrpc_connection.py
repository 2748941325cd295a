"""Connection state machines and envelopes without sockets, byte-exact against spec §5/§6/§9."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.proto import ttrpc_pb2
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
    metadata_from_pairs,
)
from protocol.ttrpc.frame import (
    MAX_MESSAGE_SIZE,
    Frame,
    FrameDecoder,
    MessageType,
    encode_frame,
    encode_header,
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
from protocol.ttrpc.status import Code, ConnectionClosedError, TtrpcError

TASK = "containerd.task.v2.Task"


@dataclass(frozen=True)
class M:
    request_type: type[Message]


# KeyValue{key:"c1"} encodes exactly like ConnectRequest{id:"c1"} (field 1, string);
# Timestamp{seconds, nanos} exactly like ConnectResponse{shim_pid, task_pid}.
SERVICES: dict[str, dict[str, M]] = {
    TASK: {"Connect": M(ttrpc_pb2.KeyValue), "Kill": M(Empty)},
}


def server(strict: bool = False) -> ServerConnection[M]:
    return ServerConnection(SERVICES, strict_stream_ids=strict)


def request_frame(
    stream_id: int,
    service: str = TASK,
    method: str = "Connect",
    payload: bytes = b"",
    metadata: tuple[tuple[str, str], ...] = (),
    timeout_nano: int = 0,
) -> bytes:
    data = encode_request(RequestMessage(service, method, payload, timeout_nano, metadata))
    return encode_frame(stream_id, MessageType.REQUEST, data)


def one_event(sm: ServerConnection[M], data: bytes) -> object:
    sm.receive_data(data)
    ev = sm.next_event()
    assert sm.next_event() is None
    return ev


def decoded_reply(data: bytes) -> tuple[int, ResponseMessage]:
    dec = FrameDecoder()
    dec.feed(data)
    frames = dec.events()
    assert len(frames) == 1
    frame = frames[0]
    assert isinstance(frame, Frame)
    assert (frame.type, frame.flags) == (MessageType.RESPONSE, 0)
    return frame.stream_id, decode_response(frame.data)


# ------------------------------------------------------------------ spec §5 bytes


CONNECT_REQUEST = bytes.fromhex("00000028000000010100") + (
    b"\x0a\x17containerd.task.v2.Task" + b"\x12\x07Connect" + bytes.fromhex("1a040a026331")
)


def test_client_connect_request_is_byte_exact() -> None:
    cc = ClientConnection()
    sid, data = cc.send_request(TASK, "Connect", ttrpc_pb2.KeyValue(key="c1").SerializeToString())
    assert sid == 1
    assert data == CONNECT_REQUEST


def test_server_reads_connect_request_and_answers_byte_exact() -> None:
    sm = server()
    ev = one_event(sm, CONNECT_REQUEST)
    assert isinstance(ev, CallReceived)
    assert (ev.stream_id, ev.service, ev.method_name, ev.timeout_nano) == (1, TASK, "Connect", 0)
    assert ev.request == ttrpc_pb2.KeyValue(key="c1")
    assert ev.metadata == {}
    assert sm.in_flight == 1
    out = sm.finish_call(1, Timestamp(seconds=15894, nanos=15918))
    assert out == bytes.fromhex("00000008000000010200 1206 08967c10ae7c")
    assert sm.in_flight == 0


def test_error_response_is_byte_exact() -> None:
    sm = server()
    one_event(sm, request_frame(3))
    out = sm.fail_call(3, Code.NOT_FOUND, "container not created: not found")
    assert out == bytes.fromhex("00000026000000030200 0a24 0805 1220") + (
        b"container not created: not found"
    )


def test_empty_success_is_a_bare_header() -> None:
    sm = server()
    one_event(sm, request_frame(5, method="Kill"))
    assert sm.finish_call(5, Empty()) == bytes.fromhex("00000000000000050200")


def test_timeout_nano_encoding() -> None:
    data = encode_request(RequestMessage("s", "m", timeout_nano=2_000_000_000))
    assert data.endswith(bytes.fromhex("2080a8d6b907"))


def test_forward_request_frame_is_byte_exact() -> None:
    # spec §9: the shim's Forward of TaskOOM{c1} in namespace "default".
    any_ = b"\x0a\x19containerd.events.TaskOOM" + b"\x12\x04\x0a\x02c1"
    envelope = (
        bytes.fromhex("0a080880e2cfaa061001")
        + b"\x12\x07default"
        + b"\x1a\x0a/tasks/oom"
        + b"\x22\x21"
        + any_
    )
    payload = b"\x0a\x42" + envelope
    expected = (
        bytes.fromhex("000000a8000000010100")
        + b"\x0a\x2acontainerd.services.events.ttrpc.v1.Events"
        + b"\x12\x07Forward"
        + b"\x1a\x44"
        + payload
        + bytes.fromhex("2080e497d012")
        + b"\x2a\x25\x0a\x1acontainerd-namespace-ttrpc\x12\x07default"
    )
    cc = ClientConnection()
    _, data = cc.send_request(
        "containerd.services.events.ttrpc.v1.Events",
        "Forward",
        payload,
        timeout_nano=5_000_000_000,
        metadata=[("containerd-namespace-ttrpc", "default")],
    )
    assert data == expected


# ------------------------------------------------------------------ envelopes


def test_response_with_explicit_ok_status_is_success() -> None:
    raw = ttrpc_pb2.Response(payload=b"xy")
    raw.status.code = 0
    assert decode_response(raw.SerializeToString()) == ResponseMessage(payload=b"xy")


def test_error_response_never_carries_payload() -> None:
    data = encode_response(ResponseMessage(code=5, message="gone", payload=b"ignored"))
    assert ttrpc_pb2.Response.FromString(data).payload == b""


def test_request_round_trip_with_repeated_metadata() -> None:
    req = RequestMessage("a.B", "C", b"\x01", -5, (("k", "1"), ("k", "2"), ("x", "y")))
    assert decode_request(encode_request(req)) == req


@pytest.mark.parametrize("data", [b"\x0a\x05ab", b"\xff", b"\x0a\x02\xff\xfe"])
def test_undecodable_envelopes(data: bytes) -> None:
    with pytest.raises(MessageDecodeError):
        decode_request(data)
    with pytest.raises(MessageDecodeError):
        decode_response(data)


# ------------------------------------------------------------------ server rules (§6)


def reply_of(ev: object) -> tuple[int, Code, str]:
    assert isinstance(ev, ErrorReply)
    sid, resp = decoded_reply(ev.data)
    assert (sid, resp.code, resp.message, resp.payload) == (ev.stream_id, ev.code, ev.message, b"")
    return ev.stream_id, ev.code, ev.message


def test_oversized_frame_answered_with_8_and_connection_continues() -> None:
    sm = server()
    n = MAX_MESSAGE_SIZE + 1
    sm.receive_data(encode_header(n, 7, MessageType.REQUEST))
    assert sm.next_event() is None
    sm.receive_data(bytes(n))
    assert reply_of(sm.next_event()) == (
        7,
        Code.RESOURCE_EXHAUSTED,
        "message length 4194305 exceed maximum message size of 4194304",
    )
    assert isinstance(one_event(sm, request_frame(9)), CallReceived)


def test_even_stream_id_refused() -> None:
    assert reply_of(one_event(server(), request_frame(2))) == (
        2,
        Code.INVALID_ARGUMENT,
        "StreamID must be odd for client initiated streams",
    )


def test_undecodable_request_even_on_even_id_is_unmarshal_error() -> None:
    # ttrpc 1.1 decodes before checking parity.
    sid, code, msg = reply_of(one_event(server(), encode_frame(4, 1, b"\xff")))
    assert (sid, code) == (4, Code.INVALID_ARGUMENT)
    assert msg.startswith("unmarshal request error: ")


def test_unknown_service_and_method() -> None:
    sm = server()
    assert reply_of(one_event(sm, request_frame(1, service="foo.Bar"))) == (
        1,
        Code.UNIMPLEMENTED,
        "service foo.Bar",
    )
    assert reply_of(one_event(sm, request_frame(3, method="Bogus"))) == (
        3,
        Code.UNIMPLEMENTED,
        "method Bogus",
    )
    assert sm.in_flight == 0


def test_undecodable_payload_is_internal() -> None:
    sid, code, msg = reply_of(one_event(server(), request_frame(1, payload=b"\x0a\x09c1")))
    assert (sid, code) == (1, Code.INTERNAL)
    assert msg.startswith("ttrpc: error unmarshalling payload: ")


@pytest.mark.parametrize("type_", [MessageType.RESPONSE, MessageType.DATA, 0, 200])
def test_non_request_frames_ignored(type_: int) -> None:
    sm = server()
    assert one_event(sm, encode_frame(1, type_, b"junk")) == FrameIgnored(1, type_)
    assert isinstance(one_event(sm, request_frame(1)), CallReceived)


def test_lenient_ids_allow_reuse_and_decrease() -> None:
    sm = server()
    for sid in (5, 5, 1):
        assert isinstance(one_event(sm, request_frame(sid)), CallReceived)
    assert sm.in_flight == 3
    assert sm.finish_call(5, Empty()) is not None
    assert sm.finish_call(5, Empty()) is not None
    with pytest.raises(KeyError):
        sm.finish_call(5, Empty())


def test_strict_ids_must_increase() -> None:
    sm = server(strict=True)
    assert isinstance(one_event(sm, request_frame(5)), CallReceived)
    for sid in (5, 3):
        assert reply_of(one_event(sm, request_frame(sid))) == (
            sid,
            Code.INVALID_ARGUMENT,
            "StreamID cannot be re-used and must increment",
        )
    assert isinstance(one_event(sm, request_frame(7)), CallReceived)
    # 1.2 checks parity first and for every type; Data has no live stream here.
    assert reply_of(one_event(sm, encode_frame(8, MessageType.DATA, b"")))[2] == (
        "StreamID must be odd for client initiated streams"
    )
    assert reply_of(one_event(sm, encode_frame(9, MessageType.DATA, b"")))[2] == (
        "StreamID is no longer active"
    )


def test_metadata_lowercased_and_repeats_kept() -> None:
    md = (("Trace", "a"), ("x-k", "1"), ("TRACE", "b"))
    ev = one_event(server(), request_frame(1, metadata=md, timeout_nano=-3))
    assert isinstance(ev, CallReceived)
    assert ev.metadata == {"trace": ("a", "b"), "x-k": ("1",)}
    assert ev.timeout_nano == -3
    assert metadata_from_pairs([]) == {}


def test_nil_result_is_unknown() -> None:
    sm = server()
    one_event(sm, request_frame(1))
    out = sm.finish_call(1, None)
    assert out is not None
    assert decoded_reply(out) == (1, ResponseMessage(2, "ttrpc: marshal called with nil"))


def test_result_too_large_becomes_status_8() -> None:
    sm = server()
    one_event(sm, request_frame(1))
    out = sm.finish_call(1, ttrpc_pb2.KeyValue(key="x" * MAX_MESSAGE_SIZE))
    assert out is not None
    sid, resp = decoded_reply(out)
    assert (sid, resp.code) == (1, Code.RESOURCE_EXHAUSTED)
    assert resp.message.startswith("message length 41943")


def test_fail_with_ok_code_still_fails() -> None:
    sm = server()
    one_event(sm, request_frame(1))
    out = sm.fail_call(1, 0, "weird")
    assert out is not None
    assert decoded_reply(out)[1].code == Code.UNKNOWN


def test_peer_close_stops_calls_and_drops_answers() -> None:
    sm = server()
    sm.receive_data(request_frame(1) + request_frame(3) + b"\x00\x00")
    assert isinstance(sm.next_event(), CallReceived)
    assert sm.receive_eof() is False  # two bytes of a header were pending
    assert sm.next_event() is None  # the complete request 3 is not started
    sm.receive_data(request_frame(5))
    assert sm.next_event() is None
    assert sm.finish_call(1, Empty()) is None
    assert sm.in_flight == 0


def test_registry_is_read_live() -> None:
    services: dict[str, dict[str, M]] = {}
    sm: ServerConnection[M] = ServerConnection(services)
    assert reply_of(one_event(sm, request_frame(1)))[1] == Code.UNIMPLEMENTED
    services[TASK] = {"Connect": M(ttrpc_pb2.KeyValue)}
    assert isinstance(one_event(sm, request_frame(3)), CallReceived)


@settings(max_examples=150, deadline=None)
@given(chunks=st.lists(st.binary(max_size=80), max_size=8), strict=st.booleans())
def test_server_survives_garbage(chunks: list[bytes], strict: bool) -> None:
    sm = server(strict)
    for chunk in chunks:
        sm.receive_data(chunk)
        while (ev := sm.next_event()) is not None:
            if isinstance(ev, ErrorReply):
                decoded_reply(ev.data)
            elif isinstance(ev, CallReceived):
                assert ev.stream_id % 2 == 1
                assert sm.finish_call(ev.stream_id, Empty()) is not None
    sm.receive_eof()
    assert sm.in_flight == 0


# ------------------------------------------------------------------ client (§7)


def response_frame(sid: int, resp: ResponseMessage, type_: int = MessageType.RESPONSE) -> bytes:
    return encode_frame(sid, type_, encode_response(resp))


def test_client_ids_increase_by_two() -> None:
    cc = ClientConnection()
    assert [cc.send_request("s", "m", b"")[0] for _ in range(4)] == [1, 3, 5, 7]
    assert cc.pending == {1, 3, 5, 7}


def test_client_routes_out_of_order_answers() -> None:
    cc = ClientConnection()
    for _ in range(3):
        cc.send_request("s", "m", b"")
    cc.receive_data(
        response_frame(5, ResponseMessage(payload=b"five"))
        + response_frame(1, ResponseMessage(code=5, message="nope"))
        + response_frame(3, ResponseMessage())
    )
    evs = [cc.next_event() for _ in range(3)]
    assert cc.next_event() is None
    assert evs[0] == CallCompleted(5, b"five")
    assert isinstance(evs[1], CallFailed)
    assert (evs[1].stream_id, evs[1].error.code, evs[1].error.message) == (1, 5, "nope")
    assert evs[2] == CallCompleted(3, b"")
    assert cc.pending == set()


def test_client_unknown_and_late_answers() -> None:
    cc = ClientConnection()
    sid, _ = cc.send_request("s", "m", b"")
    cc.abandon(sid)
    cc.receive_data(response_frame(sid, ResponseMessage()) + response_frame(99, ResponseMessage()))
    assert cc.next_event() == LateResponse(sid)
    assert cc.next_event() == UnknownStream(99, MessageType.RESPONSE)
    # A second answer on the same id is no longer "late".
    cc.receive_data(response_frame(sid, ResponseMessage()))
    assert cc.next_event() == UnknownStream(sid, MessageType.RESPONSE)


def test_client_protocol_errors_fail_only_that_call() -> None:
    cc = ClientConnection()
    for _ in range(3):
        cc.send_request("s", "m", b"")
    cc.receive_data(
        encode_frame(1, MessageType.DATA, b"")
        + encode_frame(3, MessageType.RESPONSE, b"\xff")
        + encode_header(MAX_MESSAGE_SIZE + 1, 5, MessageType.RESPONSE)
        + bytes(MAX_MESSAGE_SIZE + 1)
    )
    codes = []
    while (ev := cc.next_event()) is not None:
        assert isinstance(ev, CallFailed)
        codes.append((ev.stream_id, ev.error.code))
    assert codes == [(1, Code.INTERNAL), (3, Code.INTERNAL), (5, Code.RESOURCE_EXHAUSTED)]


def test_client_refuses_oversized_request_locally() -> None:
    cc = ClientConnection()
    with pytest.raises(TtrpcError) as info:
        cc.send_request("s", "m", bytes(MAX_MESSAGE_SIZE))
    assert info.value.code == Code.RESOURCE_EXHAUSTED
    assert info.value.message.startswith("message length 4194")
    assert cc.send_request("s", "m", b"")[0] == 1  # no id was used


def test_client_close_fails_pending_and_refuses_new_calls() -> None:
    cc = ClientConnection()
    cc.send_request("s", "m", b"")
    cc.send_request("s", "m", b"")
    assert cc.close() == [1, 3]
    assert cc.close() == []
    with pytest.raises(ConnectionClosedError) as info:
        cc.send_request("s", "m", b"")
    assert info.value.message == "ttrpc: closed"
    assert info.value.code == Code.UNAVAILABLE


def test_client_and_server_machines_talk() -> None:
    cc = ClientConnection()
    sm = server()
    sid, data = cc.send_request(
        TASK,
        "Connect",
        ttrpc_pb2.KeyValue(key="c9").SerializeToString(),
        metadata=[("K", "v")],
        timeout_nano=7,
    )
    ev = one_event(sm, data)
    assert isinstance(ev, CallReceived)
    assert (ev.metadata, ev.timeout_nano) == ({"k": ("v",)}, 7)
    out = sm.finish_call(ev.stream_id, Timestamp(seconds=1))
    assert out is not None
    cc.receive_data(out)
    done = cc.next_event()
    assert isinstance(done, CallCompleted)
    assert done.stream_id == sid
    assert Timestamp.FromString(done.payload).seconds == 1


# ------------------------------------------------------------------ status


def test_ttrpc_error_keeps_unknown_codes() -> None:
    assert TtrpcError(42, "x").code == 42
    err = TtrpcError(5, "missing")
    assert err.code is Code.NOT_FOUND
    assert str(err) == "NOT_FOUND: missing"
    assert [int(c) for c in Code] == list(range(17))
