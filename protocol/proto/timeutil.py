"""Timestamps as containerd expects them.

A process that has not exited reports Go's zero ``time.Time`` (0001-01-01Z),
which containerd 1.6 also substitutes for an absent timestamp.
"""

from __future__ import annotations

import time

from google.protobuf import timestamp_pb2

GO_ZERO_TIME_SECONDS = -62135596800
_NS_PER_S = 1_000_000_000


def go_zero_time() -> timestamp_pb2.Timestamp:
    """A fresh zero-time message (messages are mutable, so never share one)."""
    return timestamp_pb2.Timestamp(seconds=GO_ZERO_TIME_SECONDS, nanos=0)


GO_ZERO_TIME = go_zero_time()


def timestamp_from_ns(ns: int) -> timestamp_pb2.Timestamp:
    # divmod floors, so pre-epoch instants still get nanos in [0, 1e9).
    seconds, nanos = divmod(ns, _NS_PER_S)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def timestamp_now() -> timestamp_pb2.Timestamp:
    return timestamp_from_ns(time.time_ns())


def ns_from_timestamp(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * _NS_PER_S + ts.nanos


def is_zero_time(ts: timestamp_pb2.Timestamp | None) -> bool:
    """True for "no exit time": absent, the Go zero time, or 1970-01-01 (2.x decoding)."""
    if ts is None:
        return True
    return (ts.seconds, ts.nanos) in ((GO_ZERO_TIME_SECONDS, 0), (0, 0))
