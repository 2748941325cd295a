"""ttrpc framing, sans-IO: bytes in, frames out (spec ttrpc.md §2).

A frame is a 10-byte header (data length u32 BE, stream id u32 BE, type u8, flags u8)
followed by ``length`` bytes of data. Nothing here touches a socket; the asyncio layers
feed received bytes to a ``FrameDecoder`` and write what ``encode_frame`` returns.
"""

from __future__ import annotations

import enum
import struct
from typing import Final, NamedTuple

__all__ = [
    "HEADER_SIZE",
    "MAX_MESSAGE_SIZE",
    "MAX_STREAM_ID",
    "DecoderClosedError",
    "Flags",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameTooLargeError",
    "MessageType",
    "OversizedFrame",
    "TruncatedFrameError",
    "encode_frame",
    "encode_header",
    "oversize_message",
]

HEADER_SIZE: Final = 10
# Go ttrpc's messageLengthMax. Exactly this many bytes is allowed; one more is refused.
# Both peers enforce it, so going above it would break interop, not just policy.
MAX_MESSAGE_SIZE: Final = 4 << 20
# Stream ids are u32 on the wire.
MAX_STREAM_ID: Final = 0xFFFF_FFFF

_HEADER: Final = struct.Struct(">IIBB")


class MessageType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    # ttrpc >= 1.2 streaming only; never seen on shim connections.
    DATA = 3


class Flags(enum.IntFlag):
    """Frame flags (ttrpc >= 1.2). Always 0 on unary frames."""

    REMOTE_CLOSED = 0x01
    REMOTE_OPEN = 0x02
    NO_DATA = 0x04


class FrameError(Exception):
    """Base of every error this module raises."""


class FrameTooLargeError(FrameError):
    """Refused to encode data longer than the limit (the peer would refuse it anyway)."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(oversize_message(length, limit))
        self.length = length
        self.limit = limit


class TruncatedFrameError(FrameError):
    """The byte stream ended inside a frame (header or data)."""


class DecoderClosedError(FrameError):
    """Bytes were fed after ``close()``."""


def oversize_message(length: int, limit: int = MAX_MESSAGE_SIZE) -> str:
    # Verbatim Go ttrpc text; peers and logs compare it.
    return f"message length {length} exceed maximum message size of {limit}"


class Frame(NamedTuple):
    """One complete frame. ``type`` is a plain int: unknown types must survive decoding
    so the connection layer can ignore them (forward compatibility)."""

    stream_id: int
    type: int
    flags: int
    data: bytes


class OversizedFrame(NamedTuple):
    """A frame whose declared length exceeded the limit. Its data has been read and
    thrown away (the stream stays in sync); the receiver should answer status 8."""

    stream_id: int
    type: int
    flags: int
    length: int
    limit: int

    @property
    def message(self) -> str:
        return oversize_message(self.length, self.limit)


Event = Frame | OversizedFrame


def encode_header(length: int, stream_id: int, type: int, flags: int = 0) -> bytes:
    if not 0 <= length <= MAX_STREAM_ID:
        raise ValueError(f"frame length out of range: {length}")
    if not 0 <= stream_id <= MAX_STREAM_ID:
        raise ValueError(f"stream id out of range: {stream_id}")
    if not 0 <= type <= 0xFF or not 0 <= flags <= 0xFF:
        raise ValueError(f"type/flags must fit a byte: {type}, {flags}")
    return _HEADER.pack(length, stream_id, type, flags)


def encode_frame(
    stream_id: int,
    type: int,
    data: bytes,
    flags: int = 0,
    *,
    max_size: int = MAX_MESSAGE_SIZE,
) -> bytes:
    """One whole frame, header and data, ready to write in a single call.

    Raises ``FrameTooLargeError`` when ``len(data) > max_size``.
    """
    if len(data) > max_size:
        raise FrameTooLargeError(len(data), max_size)
    return encode_header(len(data), stream_id, type, flags) + data


class FrameDecoder:
    """Incremental frame decoder: ``feed()`` bytes as they arrive, then pull events
    with ``next_event()`` until it returns ``None``.

    Any byte sequence is a valid prefix of some frame stream, so decoding itself never
    fails; the only errors are ``TruncatedFrameError`` from ``close()`` when the stream
    ended mid-frame and ``DecoderClosedError`` when fed after ``close()``.

    Oversized frames are never buffered: their data is skipped as it arrives, so memory
    stays bounded by one maximum-size frame plus whatever was fed at once.
    """

    __slots__ = ("_buf", "_closed", "_discard_left", "_discarding", "max_size")

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._closed = False
        # Header of the oversized frame being skipped, and how many of its bytes remain.
        self._discarding: tuple[int, int, int, int] | None = None
        self._discard_left = 0

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a complete event."""
        return len(self._buf)

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is pending (a close here is clean)."""
        return not self._buf and self._discarding is None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise DecoderClosedError("feed after close")
        if self._discarding is not None and self._discard_left and not self._buf:
            # Skip oversized data without ever copying it into the buffer.
            skip = min(self._discard_left, len(data))
            self._discard_left -= skip
            data = memoryview(data)[skip:]
        self._buf += data

    def next_event(self) -> Event | None:
        """The next complete event, or ``None`` when more bytes are needed."""
        buf = self._buf
        if self._discarding is not None:
            if self._discard_left:
                skip = min(self._discard_left, len(buf))
                del buf[:skip]
                self._discard_left -= skip
                if self._discard_left:
                    return None
            length, stream_id, type_, flags = self._discarding
            self._discarding = None
            return OversizedFrame(stream_id, type_, flags, length, self.max_size)
        if len(buf) < HEADER_SIZE:
            return None
        length, stream_id, type_, flags = _HEADER.unpack_from(buf)
        if length > self.max_size:
            del buf[:HEADER_SIZE]
            self._discarding = (length, stream_id, type_, flags)
            self._discard_left = length
            return self.next_event()
        end = HEADER_SIZE + length
        if len(buf) < end:
            return None
        data = bytes(buf[HEADER_SIZE:end])
        del buf[:end]
        return Frame(stream_id, type_, flags, data)

    def events(self) -> list[Event]:
        """Every complete event currently available."""
        out: list[Event] = []
        while (ev := self.next_event()) is not None:
            out.append(ev)
        return out

    def close(self) -> None:
        """Mark the end of the byte stream. Complete events stay retrievable.

        Raises ``TruncatedFrameError`` if the stream ended inside a frame.
        """
        if self._closed:
            return
        self._closed = True
        buf = self._buf
        off = 0
        if self._discarding is not None:
            if self._discard_left > len(buf):
                raise TruncatedFrameError(
                    f"stream ended inside an oversized frame "
                    f"({self._discard_left - len(buf)} bytes missing)"
                )
            off = self._discard_left
        while off < len(buf):
            if len(buf) - off < HEADER_SIZE:
                raise TruncatedFrameError(
                    f"stream ended inside a frame header ({len(buf) - off} bytes)"
                )
            (length,) = struct.unpack_from(">I", buf, off)
            if off + HEADER_SIZE + length > len(buf):
                have = len(buf) - off - HEADER_SIZE
                raise TruncatedFrameError(f"stream ended inside a frame ({have} of {length} bytes)")
            off += HEADER_SIZE + length
