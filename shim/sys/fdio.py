"""Whole, blocking reads and writes on raw fds (a write may take less than asked).

`posix`, not `os`: shim/boot/quickstart.py, which imports builtins only, writes with it too.
"""

from __future__ import annotations

import posix


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[posix.write(fd, view) :]


def read_all(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes, reading until EOF."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = posix.read(fd, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
