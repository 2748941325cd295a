"""Just enough protobuf wire format for short-lived programs: the shim's `start`,
`delete` and `-info`, and (through protocol.proto.lite) the `pyshim` CLI.

Those run once per container or command; importing the protobuf runtime and
generated modules would cost more than everything else they do. Tests check the
bytes against the generated classes.
"""

from __future__ import annotations

TYPE_CHECKING = False  # collections.abc pulls in collections (~2-4 ms at start-up)

if TYPE_CHECKING:
    from collections.abc import Iterator

VARINT = 0
LEN = 2
_I64 = 1
_I32 = 5


def varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 negatives are ten-byte two's complement varints
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_varint(number: int, value: int) -> bytes:
    """A proto3 scalar: the default (0) is not written."""
    if value == 0:
        return b""
    return varint(number << 3 | VARINT) + varint(value)


def field_bytes(number: int, data: bytes, *, always: bool = False) -> bytes:
    if not data and not always:
        return b""
    return varint(number << 3 | LEN) + varint(len(data)) + data


def field_str(number: int, text: str) -> bytes:
    return field_bytes(number, text.encode())


def timestamp(seconds: int, nanos: int) -> bytes:
    """google.protobuf.Timestamp body."""
    return field_varint(1, seconds) + field_varint(2, nanos)


def any_message(type_url: str, value: bytes) -> bytes:
    """google.protobuf.Any body."""
    return field_str(1, type_url) + field_bytes(2, value)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def iter_fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) for each field; raises ValueError on bad input."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        value: int | bytes
        if wire == VARINT:
            value, pos = _read_varint(data, pos)
        elif wire == LEN:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated length-delimited field")
            value, pos = data[pos : pos + size], pos + size
        elif wire == _I64:
            value, pos = int.from_bytes(data[pos : pos + 8], "little"), pos + 8
        elif wire == _I32:
            value, pos = int.from_bytes(data[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated fixed-size field")
        yield number, wire, value


def decode_any(data: bytes) -> tuple[str, bytes]:
    """(type_url, value) of a serialized google.protobuf.Any."""
    type_url, value = "", b""
    for number, wire, v in iter_fields(data):
        if number == 1 and wire == LEN and isinstance(v, bytes):
            type_url = v.decode()
        elif number == 2 and wire == LEN and isinstance(v, bytes):
            value = v
    return type_url, value


def bytes_field(data: bytes, number: int) -> bytes:
    """The last occurrence of a bytes field (proto3 last-one-wins), or b""."""
    found = b""
    for n, wire, v in iter_fields(data):
        if n == number and wire == LEN and isinstance(v, bytes):
            found = v
    return found


def string_field(data: bytes, number: int) -> str:
    """The last occurrence of a string field (proto3 last-one-wins), or ""."""
    return bytes_field(data, number).decode()
