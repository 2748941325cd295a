from __future__ import annotations

import os
from pathlib import Path

import pytest

from shim.procfs import stat_fields


def test_own_stat() -> None:
    fields = stat_fields(os.getpid())
    assert fields[0] in (b"R", b"S")
    assert int(fields[1]) == os.getppid()


def test_comm_with_spaces_and_parens(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "stat").write_bytes(b"42 (a) b) (c) S 7 42 42 0 -1\n")
    assert stat_fields(42, str(tmp_path))[:2] == [b"S", b"7"]


def test_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        stat_fields(43, str(tmp_path))
    (tmp_path / "44").mkdir()
    (tmp_path / "44" / "stat").write_bytes(b"44 no comm S 1\n")
    with pytest.raises(ValueError):
        stat_fields(44, str(tmp_path))
