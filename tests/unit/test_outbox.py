"""The event outbox log (shim/outbox.py): its framing, and the open file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from shim import outbox as outbox_mod
from shim.outbox import ACK, EVENT, Outbox, encode, outbox_path, parse, undelivered


def test_parse_gives_the_events_not_acknowledged_in_order() -> None:
    data = (
        encode(EVENT, 0, b"zero")
        + encode(EVENT, 1, b"one")
        + encode(ACK, 0)
        + encode(EVENT, 2, b"")
        + encode(EVENT, 3, b"three")
        + encode(ACK, 3)
    )
    parsed = parse(data)
    assert parsed.events == [(1, b"one"), (2, b"")]
    assert parsed.next_seq == 4
    assert parsed.end == len(data)


def test_parse_of_nothing() -> None:
    assert parse(b"") == outbox_mod.Parsed([], 0, 0)


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: r[:-1],  # cut short
        lambda r: r[:5],  # inside the header
        lambda r: r[:-1] + bytes([r[-1] ^ 1]),  # fails its checksum
        lambda r: b"X" + r[1:],  # not a kind we write
        lambda r: bytes(len(r)),  # zeros: grown, never written
    ],
)
def test_parse_stops_at_the_first_bad_record(damage: object) -> None:
    good = encode(EVENT, 0, b"kept")
    bad = damage(encode(EVENT, 1, b"lost"))  # type: ignore[operator]
    parsed = parse(good + bad + encode(EVENT, 2, b"after"))
    assert parsed.events == [(0, b"kept")]
    assert parsed.end == len(good)


def _bundle(tmp_path: Path) -> str:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    return str(bundle)


def test_a_log_empties_once_everything_is_delivered(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    box, left = Outbox.open(bundle)
    assert left == [] and oct(outbox_path(bundle).stat().st_mode & 0o777) == "0o600"
    assert (box.append(b"a"), box.append(b"b")) == (0, 1)
    a, b = 0, 1
    assert undelivered(bundle) == [b"a", b"b"]
    box.acknowledge(b)  # out of order: only b is marked
    assert undelivered(bundle) == [b"a"]
    box.acknowledge(a)
    assert outbox_path(bundle).stat().st_size == 0
    # Numbers go on after the log was emptied, so a stale mark cannot hit a new event.
    assert box.append(b"c") == 2
    box.close()


def test_a_later_open_continues_the_numbers_and_gets_what_is_left(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    box, _ = Outbox.open(bundle)
    for payload in (b"a", b"b", b"c"):
        box.append(payload)
    box.acknowledge(1)
    box.close()
    again, left = Outbox.open(bundle)
    assert left == [(0, b"a"), (2, b"c")]
    assert again.append(b"d") == 3
    again.close()


def test_open_cuts_a_torn_tail_so_later_records_stay_readable(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    box, _ = Outbox.open(bundle)
    box.append(b"a")
    box.close()
    with open(outbox_path(bundle), "ab") as f:
        f.write(encode(EVENT, 1, b"torn")[:-2])
    again, left = Outbox.open(bundle)
    assert left == [(0, b"a")]
    again.append(b"b")
    assert undelivered(bundle) == [b"a", b"b"]
    again.close()


def test_a_failed_append_leaves_no_partial_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = _bundle(tmp_path)
    box, _ = Outbox.open(bundle)
    box.append(b"a")

    def half_then_full(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outbox_mod, "write_all", half_then_full)
    assert box.append(b"b" * 100) is None
    monkeypatch.undo()
    assert box.append(b"c") is not None
    assert undelivered(bundle) == [b"a", b"c"]
    box.close()


def test_release_closes_once_the_last_pending_event_is_delivered(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    box, _ = Outbox.open(bundle)
    seq = box.append(b"a")
    assert seq is not None
    fds = set(os.listdir("/proc/self/fd"))
    box.release()
    assert set(os.listdir("/proc/self/fd")) == fds  # still open: one is pending
    box.acknowledge(seq)
    assert len(set(os.listdir("/proc/self/fd"))) == len(fds) - 1
    assert outbox_path(bundle).stat().st_size == 0


def test_open_never_creates_a_removed_bundle(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Outbox.open(str(tmp_path / "gone"))
    assert not (tmp_path / "gone").exists()


def test_open_refuses_a_symlinked_state_dir(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, Path(bundle) / "pyshim")
    with pytest.raises(OSError):
        Outbox.open(bundle)
    assert list(elsewhere.iterdir()) == []
