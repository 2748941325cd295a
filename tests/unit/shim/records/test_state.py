from __future__ import annotations

import os
import stat
from pathlib import Path

import msgspec
import pytest

from shim.records.recordlog import RECORD, encode, log_path
from shim.records.state import (
    ExitLog,
    ExitRecord,
    RecordError,
    read_record,
    write_atomic,
    write_record,
)
from shim.records.statedir import EXIT_LOG


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
    path = tmp_path / "pyshim" / "r.json"
    assert read_record(path, ExitRecord) is None
    write_record(path, _record())
    assert read_record(path, ExitRecord) == _record()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_record(path, _record(exit_status=0))
    got = read_record(path, ExitRecord)
    assert got is not None and got.exit_status == 0 and got.version == 1
    # No temporary files left behind.
    assert os.listdir(path.parent) == ["r.json"]


def test_exit_log_round_trip(tmp_path: Path) -> None:
    bundle = str(tmp_path)
    exits = ExitLog(bundle)
    exits.record(_record(exec_id="e1", pid=7, exit_status=1))
    exits.record(_record())
    exits.record(_record(exec_id="e2", pid=8))
    exits.forget("e2")  # a deleted exec
    exits.forget("never-recorded")
    exits.close()
    again, records = ExitLog.load(bundle, "c1")
    assert records == {"e1": _record(exec_id="e1", pid=7, exit_status=1), "c1": _record()}
    again.forget("e1")
    again.close()
    assert ExitLog.load(bundle, "c1")[1] == {"c1": _record()}
    # Another container's records in the same bundle are not this one's.
    assert ExitLog.load(bundle, "c2")[1] == {}


def test_exit_log_keeps_the_latest_record_of_a_process(tmp_path: Path) -> None:
    exits = ExitLog(str(tmp_path))
    exits.record(_record(exit_status=255))
    exits.record(_record(exit_status=3))
    exits.close()
    assert ExitLog.load(str(tmp_path), "c1")[1]["c1"].exit_status == 3


def _plant(bundle: Path, payload: bytes, seq: int = 0) -> None:
    path = Path(log_path(str(bundle), EXIT_LOG))
    path.parent.mkdir(exist_ok=True)
    with open(path, "ab") as f:
        f.write(encode(RECORD, seq, payload))


def _future(**kw: object) -> bytes:
    return msgspec.json.encode({**msgspec.structs.asdict(_record(**kw)), "version": 2})


def test_exit_log_refuses_an_unusable_init_record_and_skips_an_exec_one(tmp_path: Path) -> None:
    _plant(tmp_path, _future(exec_id="e1"), 0)
    _plant(tmp_path, msgspec.json.encode(_record(exec_id="e2")), 1)
    _plant(tmp_path, b"{not json", 2)  # whose it is cannot be told: nobody's
    exits, records = ExitLog.load(str(tmp_path), "c1")
    exits.close()
    assert list(records) == ["e2"]
    _plant(tmp_path, _future(), 3)
    with pytest.raises(RecordError, match="has version 2; this shim reads version 1"):
        ExitLog.load(str(tmp_path), "c1")


def test_exit_records_of_a_shim_before_the_log_move_into_it(tmp_path: Path) -> None:
    legacy = tmp_path / "pyshim" / "exits"
    legacy.mkdir(parents=True)
    (legacy / "c1.json").write_bytes(msgspec.json.encode(_record()))
    (legacy / "e1.json").write_bytes(msgspec.json.encode(_record(exec_id="e1")))
    (legacy / "e2.json").write_bytes(_future(exec_id="e2"))  # unusable: stays
    (legacy / ".e3.json.1.tmp").write_bytes(msgspec.json.encode(_record(exec_id="e3")))
    exits, records = ExitLog.load(str(tmp_path), "c1")
    exits.close()
    assert records == {"c1": _record(), "e1": _record(exec_id="e1")}
    assert sorted(os.listdir(legacy)) == [".e3.json.1.tmp", "e2.json"]
    # Now in the log: a later load finds them without the files.
    assert ExitLog.load(str(tmp_path), "c1")[1] == records
    (legacy / "c1.json").write_bytes(_future())
    with pytest.raises(RecordError, match="version 2"):
        ExitLog.load(str(tmp_path), "c1")


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


def test_a_whole_file_record_is_atomic_without_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "fsync", calls.append)
    path = tmp_path / "pyshim" / "container.json"
    write_atomic(path, b"old")
    write_atomic(path, b"new")
    assert calls == []
    assert path.read_bytes() == b"new"
    assert os.listdir(path.parent) == ["container.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_exit_record_that_cannot_move_into_the_log_is_still_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    legacy = tmp_path / "pyshim" / "exits"
    legacy.mkdir(parents=True)
    (legacy / "c1.json").write_bytes(msgspec.json.encode(_record()))

    def full(self: ExitLog, record: ExitRecord) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ExitLog, "record", full)
    exits, records = ExitLog.load(str(tmp_path), "c1")
    exits.close()
    assert records == {"c1": _record()}
    assert os.listdir(legacy) == ["c1.json"]  # kept for the next try
