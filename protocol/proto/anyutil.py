"""Packing protobuf messages into ``google.protobuf.Any`` the way containerd does.

containerd 1.6 resolves an Any only by the exact registered message name, so we
always emit the bare full name (``containerd.events.TaskExit``). Newer senders
may use ``type.googleapis.com/<name>``; decoding accepts both.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

M = TypeVar("M", bound=Message)


class AnyTypeError(ValueError):
    """The Any holds a different message type than the one asked for."""


def type_name(type_url: str) -> str:
    """The protobuf full name in a type URL (everything after the last ``/``)."""
    return type_url.rsplit("/", 1)[-1]


def pack(msg: Message) -> any_pb2.Any:
    return any_pb2.Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


def is_type(value: any_pb2.Any, message_type: type[Message]) -> bool:
    return type_name(value.type_url) == message_type.DESCRIPTOR.full_name


def unpack(value: any_pb2.Any, message_type: type[M]) -> M:
    want = message_type.DESCRIPTOR.full_name
    got = type_name(value.type_url)
    if got != want:
        raise AnyTypeError(f"Any holds {value.type_url!r}, expected {want!r}")
    msg = message_type()
    try:
        msg.ParseFromString(value.value)
    except DecodeError as exc:
        raise AnyTypeError(f"Any of type {want!r} does not decode: {exc}") from exc
    return msg
