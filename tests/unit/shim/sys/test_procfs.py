from __future__ import annotations

import os
from pathlib import Path

import pytest

from shim.sys.procfs import gone, stat_fields


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


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"45 (sh) S 1 45\n", False),
        (b"45 (sh) R 1 45\n", False),
        (b"45 (sh) D 1 45\n", False),
        (b"45 (sh) Z 1 45\n", True),
        (b"45 (sh) X 1 45\n", True),
        (b"45 no comm S 1\n", True),
        (None, True),
    ],
)
def test_gone(tmp_path: Path, content: bytes | None, expected: bool) -> None:
    if content is not None:
        (tmp_path / "45").mkdir()
        (tmp_path / "45" / "stat").write_bytes(content)
    assert gone(45, str(tmp_path)) is expected


def test_gone_for_real_processes() -> None:
    assert not gone(os.getpid())
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # a zombie, not reaped yet
    assert gone(pid)
    os.waitpid(pid, 0)
    assert gone(pid)
