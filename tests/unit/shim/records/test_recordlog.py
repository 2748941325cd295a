"""Append-only record logs (shim/records/recordlog.py): the framing, and the open file."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from shim.records import recordlog
from shim.records.recordfile import RecordError
from shim.records.recordlog import DONE, RECORD, RecordLog, encode, log_path, parse, read_live
from shim.records.statedir import UnsafePathError


def test_parse_gives_the_records_not_done_with_in_order() -> None:
    data = (
        encode(RECORD, 0, b"zero")
        + encode(RECORD, 1, b"one")
        + encode(DONE, 0)
        + encode(RECORD, 2, b"")
        + encode(RECORD, 3, b"three")
        + encode(DONE, 3)
    )
    parsed = parse(data)
    assert parsed.live == [(1, b"one"), (2, b"")]
    assert parsed.next_seq == 4
    assert parsed.end == len(data)


def test_parse_of_nothing() -> None:
    parsed = parse(b"")
    assert (parsed.live, parsed.next_seq, parsed.end) == ([], 0, 0)


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: r[:-1],  # cut short
        lambda r: r[:5],  # inside the header
        lambda r: r[:-1] + bytes([r[-1] ^ 1]),  # fails its checksum
        lambda r: b"X" + r[1:],  # not a kind we write
        lambda r: bytes(len(r)),  # zeros: the file grew, the data never reached the disk
    ],
)
def test_parse_stops_at_the_first_bad_record(damage: Callable[[bytes], bytes]) -> None:
    good = encode(RECORD, 0, b"kept")
    parsed = parse(good + damage(encode(RECORD, 1, b"lost")) + encode(RECORD, 2, b"after"))
    assert parsed.live == [(0, b"kept")]
    assert parsed.end == len(good)


def _bundle(tmp_path: Path) -> str:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    return str(bundle)


def _live(bundle: str) -> list[bytes]:
    return [payload for _, payload in read_live(log_path(bundle, "t.log"))]


def test_the_file_is_made_on_the_first_append_and_emptied_when_all_is_done(
    tmp_path: Path,
) -> None:
    bundle = _bundle(tmp_path)
    log, left = RecordLog.load(bundle, "t.log")
    assert left == [] and os.listdir(bundle) == []  # nothing appended: no file, no dir
    assert (log.append(b"a"), log.append(b"b")) == (0, 1)
    path = Path(log_path(bundle, "t.log"))
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    assert _live(bundle) == [b"a", b"b"]
    log.done(1)  # out of order: only b goes
    assert _live(bundle) == [b"a"]
    log.done(0)
    assert path.stat().st_size == 0
    # Numbers go on after the file was emptied, so a stale mark cannot hit a new record.
    assert log.append(b"c") == 2
    log.close()


def test_a_later_load_continues_the_numbers_and_gets_what_is_left(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    log, _ = RecordLog.load(bundle, "t.log")
    for payload in (b"a", b"b", b"c"):
        log.append(payload)
    log.done(1)
    log.close()
    again, left = RecordLog.load(bundle, "t.log")
    assert left == [(0, b"a"), (2, b"c")] and again.torn == 0
    assert again.append(b"d") == 3
    again.close()


def _one_record_and_a_torn_one(bundle: str, payload: bytes) -> int:
    """A log holding ``payload`` (seq 0), then a record cut short; the torn length."""
    log, _ = RecordLog.load(bundle, "t.log")
    log.append(payload)
    log.close()
    torn = encode(RECORD, 1, b"torn")[:-2]
    with open(log_path(bundle, "t.log"), "ab") as f:
        f.write(torn)
    return len(torn)


def test_load_cuts_a_torn_tail_so_later_records_stay_readable(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    torn = _one_record_and_a_torn_one(bundle, b"a")
    again, left = RecordLog.load(bundle, "t.log")
    assert left == [(0, b"a")] and again.torn == torn
    again.append(b"b")
    assert _live(bundle) == [b"a", b"b"]
    again.close()


def test_a_failed_append_raises_and_leaves_no_partial_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = _bundle(tmp_path)
    log, _ = RecordLog.load(bundle, "t.log")
    log.append(b"a")

    def half_then_full(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(recordlog, "write_all", half_then_full)
    with pytest.raises(OSError, match="No space"):
        log.append(b"b" * 100)
    monkeypatch.undo()
    assert log.append(b"c") == 1
    assert _live(bundle) == [b"a", b"c"]
    log.close()


def test_a_durable_log_syncs_each_record_and_the_directory_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def sync(fd: int, real: Callable[[int], None] = real, name: str = name) -> None:
            synced.append(f"{name} {os.path.basename(os.readlink(f'/proc/self/fd/{fd}'))}")
            real(fd)

        monkeypatch.setattr(os, name, sync)
    bundle = _bundle(tmp_path)
    log, _ = RecordLog.load(bundle, "t.log", durable=True)
    log.append(b"a")
    log.append(b"b")
    log.done(0)  # marks are never synced
    assert synced == ["fsync pyshim", "fdatasync t.log", "fdatasync t.log"]
    log.close()
    plain, _ = RecordLog.load(bundle, "u.log")
    plain.append(b"a")
    assert len(synced) == 3
    plain.close()


def test_release_closes_once_the_last_record_is_done(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    log, _ = RecordLog.load(bundle, "t.log")
    seq = log.append(b"a")
    fds = set(os.listdir("/proc/self/fd"))
    log.release()
    assert set(os.listdir("/proc/self/fd")) == fds  # still open: one record is live
    log.done(seq)
    assert len(set(os.listdir("/proc/self/fd"))) == len(fds) - 1
    assert Path(log_path(bundle, "t.log")).stat().st_size == 0


def test_never_creates_a_removed_bundle(tmp_path: Path) -> None:
    log, left = RecordLog.load(str(tmp_path / "gone"), "t.log")
    assert left == []
    with pytest.raises(FileNotFoundError):
        log.append(b"a")
    assert not (tmp_path / "gone").exists()


def test_refuses_a_symlinked_state_dir(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, Path(bundle) / "pyshim")
    log, _ = RecordLog.load(bundle, "t.log")
    with pytest.raises(UnsafePathError):
        log.append(b"a")
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("planted", ["symlink", "fifo"])
def test_refuses_a_log_that_is_not_a_regular_file(tmp_path: Path, planted: str) -> None:
    bundle = _bundle(tmp_path)
    path = Path(log_path(bundle, "t.log"))
    path.parent.mkdir()
    secret = tmp_path / "secret"
    secret.write_bytes(encode(RECORD, 0, b"not ours"))
    if planted == "symlink":
        path.symlink_to(secret)
    else:
        os.mkfifo(path)
    with pytest.raises(OSError if planted == "symlink" else RecordError):
        RecordLog.load(bundle, "t.log")
    with pytest.raises(OSError if planted == "symlink" else RecordError):
        read_live(str(path))
    assert secret.read_bytes() == encode(RECORD, 0, b"not ours")


def test_a_log_it_did_not_load_is_appended_after_what_is_there(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    _one_record_and_a_torn_one(bundle, b"theirs")
    mine = RecordLog(log_path(bundle, "t.log"))
    assert mine.append(b"mine") == 1  # numbered after theirs, the torn record cut off
    assert _live(bundle) == [b"theirs", b"mine"]
    mine.done(1)  # nothing of its own left: the file is emptied, theirs with it
    assert _live(bundle) == []
    mine.close()


def test_a_closed_log_refuses_appends_as_an_os_error(tmp_path: Path) -> None:
    log, _ = RecordLog.load(_bundle(tmp_path), "t.log")
    log.close()
    with pytest.raises(OSError, match="is closed") as info:
        log.append(b"late")
    assert info.value.errno == errno.EBADF
