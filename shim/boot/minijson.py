"""JSON for the per-container actions (`start`, `delete`) without importing `json`.

`import json` costs ~7-11 ms here, mostly `re` (json.decoder compiles its regexes at
import): more than everything else `start` or `delete` does. The C scanner and string
encoder of `_json` are what `json` itself uses, so valid documents give exactly the
values `json.loads` gives. Anything the fast path does not accept (bad JSON, a BOM,
UTF-16/32) is handed to the real `json`, so errors are json's `ValueError`s.
"""

from __future__ import annotations

import _json

TYPE_CHECKING = False  # typing costs ~3 ms at start-up; mypy honours this name

if TYPE_CHECKING:
    from typing import IO, Any

_WHITESPACE = " \t\n\r"  # json.decoder.WHITESPACE


def _constant(name: str) -> float:
    # json.loads accepts NaN, Infinity and -Infinity by default.
    return float(name)


class _Context:
    """The attributes `_json.make_scanner` reads from a json.JSONDecoder."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_constant)


_scan = _json.make_scanner(_Context())  # type: ignore[arg-type]  # duck-typed decoder


def _slow_loads(data: str | bytes) -> Any:
    import json

    return json.loads(data)


def loads(data: str | bytes) -> Any:
    """json.loads for str or UTF-8 bytes."""
    if isinstance(data, bytes):
        if data[:3] == b"\xef\xbb\xbf" or b"\0" in data[:4]:
            return _slow_loads(data)  # BOM or UTF-16/32: json's detection and errors
        try:
            text = data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return _slow_loads(data)
    else:
        text = data
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except (StopIteration, SystemError, ValueError, RecursionError):
        # Invalid at some point (the C scanner's own error needs json.decoder, which
        # is not imported): let json produce its usual error.
        return _slow_loads(data)
    if text[end:].strip(_WHITESPACE):
        return _slow_loads(data)  # "Extra data"
    return value


def load(fp: IO[bytes] | IO[str]) -> Any:
    return loads(fp.read())


def dumps(value: Any) -> str:
    """json.dumps(value, separators=(",", ":")) for dict/list/str/int/float/bool/None."""
    out: list[str] = []
    _encode(value, out)
    return "".join(out)


def _encode(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_json.encode_basestring_ascii(value))
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"out of range float value {value!r}")
        out.append(float.__repr__(value))
    elif isinstance(value, dict):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            if not isinstance(key, str):
                raise TypeError(f"keys must be str, not {type(key).__name__}")
            if i:
                out.append(",")
            out.append(_json.encode_basestring_ascii(key))
            out.append(":")
            _encode(item, out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
