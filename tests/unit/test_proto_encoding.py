"""Byte-exact encodings observed between containerd 1.6.20 and its Go shim
(shared/spec/ttrpc.md §5, §9, §10; shim-cli.md; types.md)."""

from __future__ import annotations

import struct

from google.protobuf import any_pb2, timestamp_pb2

from protocol.proto import anyutil, timeutil, ttrpc_pb2
from protocol.proto.events import forward_pb2
from protocol.proto.events import task_pb2 as events_pb2
from protocol.proto.rpc import status_pb2
from protocol.proto.task.v2 import shim_pb2


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def s(text: str) -> bytes:
    """A length-prefixed string field body (len < 128)."""
    raw = text.encode()
    assert len(raw) < 128
    return bytes([len(raw)]) + raw


def frame(stream_id: int, msg_type: int, data: bytes) -> bytes:
    return struct.pack(">IIBB", len(data), stream_id, msg_type, 0) + data


def test_connect_request_frame() -> None:
    payload = shim_pb2.ConnectRequest(id="c1").SerializeToString()
    req = ttrpc_pb2.Request(service="containerd.task.v2.Task", method="Connect", payload=payload)
    expected = (
        h("00 00 00 28 00 00 00 01 01 00")
        + h("0a")
        + s("containerd.task.v2.Task")
        + h("12")
        + s("Connect")
        + h("1a 04 0a 02 63 31")
    )
    assert frame(1, 1, req.SerializeToString()) == expected


def test_connect_response_frame() -> None:
    out = shim_pb2.ConnectResponse(shim_pid=15894, task_pid=15918)
    resp = ttrpc_pb2.Response(payload=out.SerializeToString())
    assert frame(1, 2, resp.SerializeToString()) == h(
        "00 00 00 08 00 00 00 01 02 00 12 06 08 96 7c 10 ae 7c"
    )
    decoded = shim_pb2.ConnectResponse.FromString(
        ttrpc_pb2.Response.FromString(h("12 06 08 96 7c 10 ae 7c")).payload
    )
    assert (decoded.shim_pid, decoded.task_pid) == (15894, 15918)


def test_error_response_frame() -> None:
    msg = "container not created: not found"
    resp = ttrpc_pb2.Response(status=status_pb2.Status(code=5, message=msg))
    expected = h("00 00 00 26 00 00 00 03 02 00 0a 24 08 05 12") + s(msg)
    assert frame(3, 2, resp.SerializeToString()) == expected


def test_empty_success_is_header_only() -> None:
    resp = ttrpc_pb2.Response(payload=b"")
    assert frame(5, 2, resp.SerializeToString()) == h("00 00 00 00 00 00 00 05 02 00")


def test_timeout_nano_two_seconds() -> None:
    assert ttrpc_pb2.Request(timeout_nano=2_000_000_000).SerializeToString() == h(
        "20 80 a8 d6 b9 07"
    )


def test_forward_frame_from_spec() -> None:
    envelope = forward_pb2.Envelope(
        timestamp=timestamp_pb2.Timestamp(seconds=1700000000, nanos=1),
        namespace="default",
        topic="/tasks/oom",
        event=anyutil.pack(events_pb2.TaskOOM(container_id="c1")),
    )
    req = ttrpc_pb2.Request(
        service="containerd.services.events.ttrpc.v1.Events",
        method="Forward",
        payload=forward_pb2.ForwardRequest(envelope=envelope).SerializeToString(),
        timeout_nano=5_000_000_000,
        metadata=[ttrpc_pb2.KeyValue(key="containerd-namespace-ttrpc", value="default")],
    )
    expected = (
        h("00 00 00 a8 00 00 00 01 01 00")
        + h("0a")
        + s("containerd.services.events.ttrpc.v1.Events")
        + h("12")
        + s("Forward")
        + h("1a 44 0a 42")
        + h("0a 08 08 80 e2 cf aa 06 10 01")
        + h("12")
        + s("default")
        + h("1a")
        + s("/tasks/oom")
        + h("22 21 0a")
        + s("containerd.events.TaskOOM")
        + h("12 04 0a 02 63 31")
        + h("20 80 e4 97 d0 12")
        + h("2a 25 0a")
        + s("containerd-namespace-ttrpc")
        + h("12")
        + s("default")
    )
    assert frame(1, 1, req.SerializeToString()) == expected


def test_delete_response_from_shim_cli_spec() -> None:
    resp = shim_pb2.DeleteResponse(
        pid=4242,
        exit_status=137,
        exited_at=timeutil.timestamp_from_ns(1_700_000_000_500_000_000),
    )
    assert resp.SerializeToString() == h(
        "08 92 21 10 89 01 1a 0c 08 80 e2 cf aa 06 10 80 ca b5 ee 01"
    )


def test_go_zero_time_is_ten_byte_varint() -> None:
    resp = shim_pb2.StateResponse(exited_at=timeutil.go_zero_time())
    assert resp.SerializeToString() == h("52 0b 08 80 92 b8 c3 98 fe ff ff ff 01")
    ts = timestamp_pb2.Timestamp.FromString(h("08 80 92 b8 c3 98 fe ff ff ff 01"))
    assert ts.seconds == timeutil.GO_ZERO_TIME_SECONDS == -62135596800


def test_map_encoding() -> None:
    req = shim_pb2.UpdateTaskRequest(annotations={"a": "b"})
    assert req.SerializeToString() == h("1a 06 0a 01 61 12 01 62")
    assert dict(
        shim_pb2.UpdateTaskRequest.FromString(h("1a 06 0a 01 61 12 01 62")).annotations
    ) == {"a": "b"}


def test_repeated_uint64_packed_and_unpacked_accepted() -> None:
    from protocol.proto.cgroups.v1 import metrics_pb2

    usage = metrics_pb2.CPUUsage(per_cpu=[1, 300])
    packed = h("22 03 01 ac 02")
    assert usage.SerializeToString() == packed
    unpacked = h("20 01 20 ac 02")
    assert list(metrics_pb2.CPUUsage.FromString(unpacked).per_cpu) == [1, 300]


def test_unknown_fields_are_skipped() -> None:
    # field 99 (varint) and field 100 (bytes) appended by some future containerd
    data = h("0a 02 63 31") + h("98 06 07") + h("a2 06 03 61 62 63")
    req = shim_pb2.StateRequest.FromString(data)
    assert req.id == "c1"
    assert req.exec_id == ""


def test_status_enum_values() -> None:
    from protocol.proto.types import task_pb2 as types_task_pb2

    names = {v.name: v.number for v in types_task_pb2.Status.DESCRIPTOR.values}
    assert names == {
        "UNKNOWN": 0,
        "CREATED": 1,
        "RUNNING": 2,
        "STOPPED": 3,
        "PAUSED": 4,
        "PAUSING": 5,
    }
    resp = shim_pb2.StateResponse(status=types_task_pb2.Status.RUNNING)
    assert resp.SerializeToString() == h("20 02")


def test_any_inside_create_request() -> None:
    opts = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=h("12 01 78"))
    req = shim_pb2.CreateTaskRequest(id="c1", options=opts)
    assert req.SerializeToString() == h(
        "0a 02 63 31 52 20 0a 19"
    ) + b"runtimeoptions.v1.Options" + h("12 03 12 01 78")
