"""The durable per-container record store."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from manager.paths import Paths
from manager.records import ContainerRecord, RecordError, RecordStore


def _record(cid: str = "c1") -> ContainerRecord:
    return ContainerRecord(id=cid, name="n", bundle="/b", created_at_ns=1, command=["echo", "hi"])


def test_round_trip_and_atomic_write(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "run", tmp_path / "state")
    store = RecordStore(paths)
    rec = _record()
    store.save(rec)
    rec.exit_status = 3
    rec.exited_at_ns = 42
    rec.status = "stopped"
    store.save(rec)
    loaded = store.load("c1")
    assert loaded == rec and loaded is not None and loaded.exited
    # No temporary file is left beside the record.
    assert os.listdir(paths.container_dir("c1")) == ["record.json"]
    assert (paths.record("c1").stat().st_mode & 0o777) == 0o600


def test_missing_is_none_and_corrupt_is_reported(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "run", tmp_path / "state")
    store = RecordStore(paths)
    assert store.load("nope") is None
    store.save(_record("good"))
    paths.container_dir("bad").mkdir(parents=True)
    paths.record("bad").write_text("{not json")
    with pytest.raises(RecordError):
        store.load("bad")
    records, problems = store.load_all()
    assert [r.id for r in records] == ["good"]
    assert len(problems) == 1 and "bad" in problems[0]


def test_unknown_version_is_refused(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "run", tmp_path / "state")
    store = RecordStore(paths)
    rec = _record()
    rec.version = 99
    store.save(rec)
    with pytest.raises(RecordError, match="version 99"):
        store.load("c1")


def test_snapshot_is_read_when_newer_and_never_replaces_a_synced_record(
    tmp_path: Path,
) -> None:
    paths = Paths(tmp_path / "run", tmp_path / "state")
    store = RecordStore(paths)
    rec = _record()
    store.save(rec, durable=False)  # the first save is durable whatever it is asked
    assert os.listdir(paths.container_dir("c1")) == ["record.json"]
    rec.status = "running"
    store.save(rec, durable=False)
    snapshot = paths.container_dir("c1") / "record.snapshot.json"
    assert snapshot.exists()
    loaded = store.load("c1")
    assert loaded is not None and loaded.status == "running"
    # What a power loss can leave of an unsynced file: empty, zeroed or cut short.
    for torn in (b"", b"\0" * 64, snapshot.read_bytes()[:20]):
        snapshot.write_bytes(torn)
        loaded = store.load("c1")
        assert loaded is not None and loaded.status == "created"
    # A durable save supersedes the snapshot and removes it.
    rec.status = "stopped"
    store.save(rec)
    assert not snapshot.exists()
    loaded = store.load("c1")
    assert loaded is not None and loaded.status == "stopped"
    # An older snapshot left beside a newer durable record (a crash between the two
    # steps of a durable save) is ignored.
    old = _record()
    old.status = "running"
    old.seq = 1
    snapshot.write_bytes(msgspec.json.encode(old))
    loaded = store.load("c1")
    assert loaded is not None and loaded.status == "stopped"
    store.delete("c1")
    assert os.listdir(paths.container_dir("c1")) == []


def test_a_removed_container_is_not_brought_back_by_a_late_save(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "run", tmp_path / "state")
    store = RecordStore(paths)
    rec = _record()
    store.save(rec)
    (paths.container_dir("c1") / "ctr.log").write_text("out\n")
    retired = store.retire("c1")
    assert retired is not None and retired.name == ".removing-c1"
    assert sorted(os.listdir(retired)) == ["ctr.log", "record.json"]
    assert store.load_all() == ([], [])
    rec.status = "stopped"
    store.save(rec)
    store.save(rec, durable=False)
    assert os.listdir(paths.containers_dir) == [".removing-c1"]
    assert store.retire("c1") is None
    # A new container (its first save) still makes its directory.
    store.save(_record("c2"))
    assert store.load("c2") is not None


def test_abandoned_is_what_a_crash_left(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "run", tmp_path / "state")
    store = RecordStore(paths)
    assert store.abandoned() == []
    for cid in ("kept", "removing", "corrupt"):
        store.save(_record(cid))
    # SIGKILLed while its files were being removed, after the rename.
    retired = store.retire("removing")
    assert retired is not None
    (retired / "record.json").unlink()
    # SIGKILLed in the first save: the directory made, the record not yet renamed in.
    paths.container_dir("unborn").mkdir()
    (paths.container_dir("unborn") / ".record.json.tmp").write_bytes(b"{")
    # A record that cannot be read is reported by load_all, never removed.
    paths.record("corrupt").write_text("{not json")
    assert store.abandoned() == [
        ("removing", retired),
        ("unborn", paths.container_dir("unborn")),
    ]
