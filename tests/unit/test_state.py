from __future__ import annotations

import os
import stat
from pathlib import Path

import msgspec
import pytest

from shim.ids import InvalidIdentifierError
from shim.state import (
    ExitRecord,
    RecordError,
    exit_record_path,
    read_record,
    write_atomic,
    write_record,
)


def _record(**kw: object) -> ExitRecord:
    fields: dict[str, object] = {
        "container_id": "c1",
        "exec_id": "",
        "pid": 42,
        "exit_status": 137,
        "exited_at_ns": 1_700_000_000_123_456_789,
    }
    fields.update(kw)
    return ExitRecord(**fields)  # type: ignore[arg-type]


def test_round_trip(tmp_path: Path) -> None:
    path = exit_record_path(str(tmp_path), "c1")
    assert path == tmp_path / "pyshim" / "exits" / "c1.json"
    assert read_record(path, ExitRecord) is None
    write_record(path, _record())
    assert read_record(path, ExitRecord) == _record()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_record(path, _record(exit_status=0))
    got = read_record(path, ExitRecord)
    assert got is not None and got.exit_status == 0 and got.version == 1
    # No temporary files left behind.
    assert os.listdir(path.parent) == ["c1.json"]


def test_refuses_bad_process_ids(tmp_path: Path) -> None:
    for bad in ("../x", "a/b", "..", "", "."):
        with pytest.raises(InvalidIdentifierError):
            exit_record_path(str(tmp_path), bad)


def test_corrupt_and_unknown_version(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_bytes(b'{"version": 1, "container_id": "c1"')
    with pytest.raises(RecordError, match="corrupt"):
        read_record(path, ExitRecord)
    path.write_bytes(b"")
    with pytest.raises(RecordError, match="corrupt"):
        read_record(path, ExitRecord)
    path.write_bytes(msgspec.json.encode({**msgspec.structs.asdict(_record()), "version": 2}))
    with pytest.raises(RecordError, match="version 2"):
        read_record(path, ExitRecord)
    path.write_bytes(b'{"version": 1, "container_id": "c1", "pid": "nope"}')
    with pytest.raises(RecordError, match="corrupt"):
        read_record(path, ExitRecord)


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "d" / "f"
    write_atomic(path, b"old")

    # Fails after the temporary file was created: it must be removed again.
    with pytest.raises(TypeError):
        write_atomic(path, 123)  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(path.parent)) == ["f"]


def _count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_records_are_fsynced_file_and_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_fsyncs(monkeypatch)
    write_record(exit_record_path(str(tmp_path), "c1"), _record())
    assert len(calls) == 2


def test_a_write_that_need_not_be_durable_is_atomic_without_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_fsyncs(monkeypatch)
    path = tmp_path / "pyshim" / "outbox" / "e.pb"
    write_atomic(path, b"old", durable=False)
    write_atomic(path, b"new", durable=False)
    assert calls == []
    assert path.read_bytes() == b"new"
    assert os.listdir(path.parent) == ["e.pb"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
