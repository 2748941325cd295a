"""Protobuf messages without the protobuf runtime, for a program whose whole run is a
few calls (the `pyshim` CLI's `run`, `wait`, `rm`, `kill`).

Importing google.protobuf's descriptor pool and a generated module costs such a
program more than everything else it does (~40 % of a `pyshim run`'s own CPU). A
``LiteMessage`` subclass declares fields as ``name: type = number(N)``; it encodes
them with ``protocol.wire`` in field-number order, as protobuf does, and skips on
decoding the fields it does not declare (as unknown fields are). Only the kinds the
messages below need: string, bytes, int (int32/uint32), int64, uint64, bool, double,
embedded messages, repeated strings and messages. ``to_dict`` is json_format's
MessageToDict for them (the CLI's `--json`). tests/unit/test_proto_lite.py checks every
declaration against the generated descriptor, and the bytes and the dicts against the
generated classes', both ways.
"""

from __future__ import annotations

import struct
import sys
import time

from google.protobuf.message import DecodeError

from protocol import wire

TYPE_CHECKING = False  # typing costs a CLI ~4 ms; only the type checker needs it
if TYPE_CHECKING:
    from typing import Any, ClassVar, Protocol, Self

    class WireMessage(Protocol):
        """What a ttrpc client needs of a message: a generated class or a LiteMessage."""

        def SerializeToString(self) -> bytes: ...

        @classmethod
        def FromString(cls, s: bytes, /) -> Self: ...


# The 64-bit integers' annotations: Python ints all the same, but ProtoJSON writes them
# as strings and a uint64 has no sign.
int64 = int
uint64 = int

_SCALARS = {
    "str": "",
    "bytes": b"",
    "int": 0,
    "int64": 0,
    "uint64": 0,
    "bool": False,
    "float": 0.0,
}
_SIGN = 1 << 63
_MASK = (1 << 64) - 1


class LiteDecodeError(DecodeError):
    """Bytes that are not this message (a DecodeError, as protobuf's own)."""


class _Number:
    __slots__ = ("number",)

    def __init__(self, number: int) -> None:
        self.number = number


def number(n: int) -> Any:
    """The field number of the annotated attribute (its default is the type's zero)."""
    return _Number(n)


class _Field:
    __slots__ = ("kind", "message", "name", "number", "repeated")

    def __init__(
        self, name: str, num: int, kind: str, repeated: bool, message: type[LiteMessage] | None
    ) -> None:
        self.name = name
        self.number = num
        self.kind = kind
        self.repeated = repeated
        self.message = message


class LiteMessage:
    FIELDS: ClassVar[tuple[_Field, ...]] = ()
    _BY_NUMBER: ClassVar[dict[int, _Field]] = {}
    _NAMES: ClassVar[frozenset[str]] = frozenset()
    # The singular message fields: they have presence (HasField), as in protobuf.
    _SUBMESSAGES: ClassVar[tuple[str, ...]] = ()
    _has: set[str]

    def __init_subclass__(cls) -> None:
        scope = vars(sys.modules[cls.__module__])
        fields = []
        # Not inspect.get_annotations: inspect alone costs a CLI more than this module.
        own = cls.__dict__.get("__annotations__", {})  # noqa: RUF063
        for name, annotation in own.items():
            declared = cls.__dict__.get(name)
            if not isinstance(declared, _Number):
                continue
            kind = annotation.replace(" ", "")
            repeated = kind.startswith("list[")
            if repeated:
                kind = kind[5:-1]
            message = None
            if kind not in _SCALARS:
                message = scope[kind]
                kind = "message"
            elif repeated and kind not in ("str", "bytes"):
                raise TypeError(f"{cls.__name__}.{name}: repeated {kind} is not supported")
            fields.append(_Field(name, declared.number, kind, repeated, message))
            # The class attribute is the default a fresh instance reads.
            if not repeated and message is None:
                setattr(cls, name, _SCALARS[kind])
            else:
                delattr(cls, name)
        cls.FIELDS = tuple(sorted(fields, key=lambda f: f.number))
        cls._BY_NUMBER = {f.number: f for f in fields}
        cls._NAMES = frozenset(f.name for f in fields)
        cls._SUBMESSAGES = tuple(
            f.name for f in cls.FIELDS if f.message is not None and not f.repeated
        )

    def __init__(self, **values: Any) -> None:
        unknown = values.keys() - self._NAMES
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {min(unknown)!r}")
        self._has = {n for n in self._SUBMESSAGES if values.get(n) is not None}
        for f in self.FIELDS:
            value = values.get(f.name)
            if f.repeated:
                setattr(self, f.name, list(value or ()))
            elif f.message is not None:
                setattr(self, f.name, f.message() if value is None else value)
            elif value is not None:
                setattr(self, f.name, value)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name) for f in self.FIELDS)

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in self.FIELDS)
        return f"{type(self).__name__}({shown})"

    def HasField(self, name: str) -> bool:
        """A singular message field given, read from the wire, or filled in since."""
        return name in self._has or bool(getattr(self, name).SerializeToString())

    def SerializeToString(self) -> bytes:
        out = []
        for f in self.FIELDS:
            value = getattr(self, f.name)
            for item in value if f.repeated else (value,):
                out.append(_encode(f, item, always=f.repeated or f.name in self._has))
        return b"".join(out)

    @classmethod
    def FromString(cls, data: bytes) -> Self:
        msg = cls()
        msg._merge(data)
        return msg

    def _merge(self, data: bytes) -> None:
        try:
            for num, wire_type, value in wire.iter_fields(data):
                f = self._BY_NUMBER.get(num)
                # Another wire type than declared: an unknown field, as protobuf reads it.
                if f is not None and wire_type == _wire_type(f):
                    self._set(f, value)
        except (ValueError, UnicodeDecodeError) as exc:
            raise LiteDecodeError(f"{type(self).__name__}: {exc}") from exc

    def _set(self, f: _Field, value: int | bytes) -> None:
        if f.kind == "message":
            assert isinstance(value, bytes) and f.message is not None
            if f.repeated:
                getattr(self, f.name).append(f.message.FromString(value))
            else:
                getattr(self, f.name)._merge(value)  # protobuf merges a repeated one
                self._has.add(f.name)
            return
        item: object
        if f.kind == "str":
            assert isinstance(value, bytes)
            item = value.decode()
        elif f.kind in ("int", "int64"):
            assert isinstance(value, int)
            value &= _MASK  # a varint may carry more than 64 bits; protobuf drops them
            item = value - (1 << 64) if value & _SIGN else value
        elif f.kind == "uint64":
            assert isinstance(value, int)
            item = value & _MASK
        elif f.kind == "bool":
            item = bool(value)
        elif f.kind == "float":
            assert isinstance(value, int)
            item = struct.unpack("<d", value.to_bytes(8, "little"))[0]
        else:
            item = value
        if f.repeated:
            getattr(self, f.name).append(item)
        else:
            setattr(self, f.name, item)


_WIRE_TYPE = {
    "int": wire.VARINT,
    "int64": wire.VARINT,
    "uint64": wire.VARINT,
    "bool": wire.VARINT,
    "float": 1,
}


def _wire_type(f: _Field) -> int:
    return _WIRE_TYPE.get(f.kind, wire.LEN)


def _encode(f: _Field, value: Any, *, always: bool) -> bytes:
    """One field; proto3 leaves out a singular scalar at its default (and so do we)."""
    kind = f.kind
    if kind == "message":
        # Written when it has content or presence (given or read, even empty).
        return wire.field_bytes(f.number, value.SerializeToString(), always=always)
    if kind == "str":
        return wire.field_bytes(f.number, value.encode(), always=always)
    if kind == "bytes":
        return wire.field_bytes(f.number, value, always=always)
    if kind == "float":
        if not value:
            return b""
        return wire.varint(f.number << 3 | 1) + struct.pack("<d", value)
    return wire.field_varint(f.number, int(value))


class Empty(LiteMessage):
    """google.protobuf.Empty."""


class Timestamp(LiteMessage):
    """google.protobuf.Timestamp."""

    seconds: int64 = number(1)
    nanos: int = number(2)

    def ns(self) -> int:
        return self.seconds * 1_000_000_000 + self.nanos


def to_dict(msg: LiteMessage) -> dict[str, Any]:
    """json_format.MessageToDict(msg, preserving_proto_field_name=True,
    always_print_fields_with_no_presence=True), key order included: the fields that
    are set in number order (protobuf's ListFields), then the others at their defaults
    (every message here declares its fields in number order), a singular message only
    when present; a Timestamp as RFC 3339, 64-bit integers as strings, bytes as base64.
    """
    out: dict[str, Any] = {}
    unset: list[_Field] = []
    for f in msg.FIELDS:
        value = getattr(msg, f.name)
        if f.repeated:
            if value:
                out[f.name] = [_json_value(f, v) for v in value]
            else:
                unset.append(f)
        elif f.message is not None:
            if msg.HasField(f.name):
                out[f.name] = _json_value(f, value)
        elif value != _SCALARS[f.kind]:
            out[f.name] = _json_value(f, value)
        else:
            unset.append(f)
    for f in unset:
        out[f.name] = [] if f.repeated else _json_value(f, _SCALARS[f.kind])
    return out


def _json_value(f: _Field, value: Any) -> Any:
    kind = f.kind
    if kind == "message":
        return timestamp_text(value) if f.message is Timestamp else to_dict(value)
    if kind in ("int64", "uint64"):
        return str(value)
    if kind == "bytes":
        import base64

        return base64.b64encode(value).decode()
    if kind == "float" and value != value:
        return "NaN"
    if kind == "float" and value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return value


# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_TIMESTAMP_MIN = -62135596800
_TIMESTAMP_MAX = 253402300799


def timestamp_text(ts: Timestamp) -> str:
    """Timestamp.ToJsonString: RFC 3339 in UTC with 0, 3, 6 or 9 fraction digits."""
    seconds, nanos = ts.seconds, ts.nanos
    if not (_TIMESTAMP_MIN <= seconds <= _TIMESTAMP_MAX and 0 <= nanos < 1_000_000_000):
        raise ValueError(f"Timestamp is not valid: {seconds}s {nanos}ns")
    t = time.gmtime(seconds)
    text = (
        f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
        f"T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    )
    if nanos == 0:
        return text + "Z"
    if nanos % 1_000_000 == 0:
        return f"{text}.{nanos // 1_000_000:03d}Z"
    if nanos % 1_000 == 0:
        return f"{text}.{nanos // 1_000:06d}Z"
    return f"{text}.{nanos:09d}Z"
