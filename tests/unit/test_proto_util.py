from __future__ import annotations

import time

import pytest
from google.protobuf import any_pb2, timestamp_pb2

from protocol.proto import anyutil, timeutil
from protocol.proto.events import task_pb2 as events_pb2
from protocol.proto.runc import options_pb2


def test_pack_uses_bare_type_url() -> None:
    packed = anyutil.pack(events_pb2.TaskExit(container_id="c1", id="c1", pid=7, exit_status=137))
    assert packed.type_url == "containerd.events.TaskExit"
    assert events_pb2.TaskExit.FromString(packed.value).exit_status == 137


@pytest.mark.parametrize(
    "url", ["containerd.runc.v1.Options", "type.googleapis.com/containerd.runc.v1.Options"]
)
def test_unpack_accepts_bare_and_prefixed(url: str) -> None:
    value = options_pb2.Options(binary_name="crun", systemd_cgroup=True).SerializeToString()
    opts = anyutil.unpack(any_pb2.Any(type_url=url, value=value), options_pb2.Options)
    assert (opts.binary_name, opts.systemd_cgroup) == ("crun", True)
    assert anyutil.is_type(any_pb2.Any(type_url=url), options_pb2.Options)


def test_unpack_mismatch_names_both_types() -> None:
    packed = anyutil.pack(events_pb2.TaskOOM(container_id="c1"))
    with pytest.raises(
        anyutil.AnyTypeError, match=r"containerd\.events\.TaskOOM.*containerd\.runc\.v1\.Options"
    ):
        anyutil.unpack(packed, options_pb2.Options)
    assert not anyutil.is_type(packed, options_pb2.Options)


def test_unpack_undecodable_value() -> None:
    bad = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"\x0a\x05ab")
    with pytest.raises(anyutil.AnyTypeError, match="does not decode"):
        anyutil.unpack(bad, options_pb2.Options)


@pytest.mark.parametrize(
    ("ns", "seconds", "nanos"),
    [
        (0, 0, 0),
        (1_700_000_000_500_000_000, 1_700_000_000, 500_000_000),
        (-1, -1, 999_999_999),
        (timeutil.GO_ZERO_TIME_SECONDS * 1_000_000_000, -62135596800, 0),
    ],
)
def test_timestamp_round_trip(ns: int, seconds: int, nanos: int) -> None:
    ts = timeutil.timestamp_from_ns(ns)
    assert (ts.seconds, ts.nanos) == (seconds, nanos)
    assert timeutil.ns_from_timestamp(ts) == ns


def test_timestamp_now_is_current() -> None:
    before = time.time_ns()
    ts = timeutil.timestamp_now()
    after = time.time_ns()
    assert before <= timeutil.ns_from_timestamp(ts) <= after
    assert 0 <= ts.nanos < 1_000_000_000


def test_zero_time() -> None:
    assert (timeutil.GO_ZERO_TIME.seconds, timeutil.GO_ZERO_TIME.nanos) == (-62135596800, 0)
    fresh = timeutil.go_zero_time()
    fresh.seconds = 5
    assert timeutil.go_zero_time().seconds == -62135596800
    assert timeutil.is_zero_time(None)
    assert timeutil.is_zero_time(timestamp_pb2.Timestamp())
    assert timeutil.is_zero_time(timeutil.go_zero_time())
    assert not timeutil.is_zero_time(timeutil.timestamp_from_ns(1))
