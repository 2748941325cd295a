"""shim/sys/fdio.py: whole reads and writes on raw fds."""

from __future__ import annotations

import os
import threading

from shim.sys.fdio import read_all, write_all


def test_write_all_writes_past_a_full_pipe_and_read_all_stops_at_eof() -> None:
    data = bytes(range(256)) * 1024  # 256 KiB: more than a pipe holds, so writes are partial
    r, w = os.pipe()
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(read_all(r, 1 << 20)))
    reader.start()
    try:
        write_all(w, data)
    finally:
        os.close(w)
    reader.join(10)
    os.close(r)
    assert got == [data]


def test_read_all_stops_at_its_limit() -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"0123456789")
        assert read_all(r, 4) == b"0123"
        assert read_all(r, 4) == b"4567"
    finally:
        os.close(r)
        os.close(w)
