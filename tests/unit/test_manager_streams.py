"""LogTail.seek_last_lines: `pyshim logs --tail N` on a real file, small and big chunks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from manager import streams
from manager.streams import LogTail

CASES = [b"", b"a\n", b"a\nb\nc\n", b"a\nb\nc", b"\n\n\n", b"a\n\nb\n", b"x" * 10 + b"\ny"]


@pytest.mark.parametrize("chunk", [3, 65536])
@pytest.mark.parametrize("data", CASES)
def test_last_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int, data: bytes
) -> None:
    monkeypatch.setattr(streams, "CHUNK", chunk)
    path = tmp_path / "log"
    path.write_bytes(data)
    lines = data.splitlines(keepends=True)
    for n in range(5):
        r, w = os.pipe()
        tail = LogTail(path, w)
        tail.seek_last_lines(n)
        tail.pump()
        tail.close()
        os.close(w)
        got = os.read(r, 4096)
        os.close(r)
        assert got == b"".join(lines[max(0, len(lines) - n) :] if n else []), (n, got)
