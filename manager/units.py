"""Sizes as people type them: ``512m``, ``1g``, ``64MiB``, ``1.5G`` or plain bytes."""

from __future__ import annotations

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes, in powers of 1024 as docker's; ValueError with the reason otherwise."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b") if text else ""
    num = t.rstrip("kmgt")
    unit = t[len(num) :]
    if not num or len(unit) > 1:
        raise ValueError(f"invalid size {text!r} (e.g. 512m, 1g)")
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"invalid size {text!r} (e.g. 512m, 1g)") from None
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return size
