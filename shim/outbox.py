"""A container's undelivered events: one append-only log, ``<bundle>/pyshim/outbox.log``.

A log and not a file per event because publishing sits on the reply path of Exec,
Start and every exit: appending to an open file costs ~1 µs, where creating and
renaming a file per event and unlinking it once delivered cost ~0.2-0.7 ms each
(bench/README.md, "Sixth round").

Records, big-endian: kind (1 byte: ``E`` an event, ``A`` the event with that sequence
number was delivered), sequence number (8), payload length (4), CRC-32 of the payload
(4), payload (the serialized Envelope; empty for ``A``). What is left to deliver is the
events in order minus the acknowledged ones. A reader stops at the first record that
is cut short or fails its checksum: what a kernel crash can leave of unsynced appends
(such a crash also takes every container with it). Once nothing is left to deliver
the log is truncated to empty, so it stays small. Nothing is fsynced; shim/events.py
says why.

The framing (``encode``, ``parse``) is pure; ``Outbox`` is the open file.
"""

from __future__ import annotations

import binascii
import contextlib
import logging
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from shim.fdio import read_all, write_all
from shim.recordfile import RecordError
from shim.state import make_private_dirs, state_dir

__all__ = ["LOG_NAME", "Outbox", "Parsed", "encode", "outbox_path", "parse", "undelivered"]

_log = logging.getLogger("shim.outbox")

LOG_NAME = "outbox.log"
EVENT = b"E"
ACK = b"A"
_HEADER = struct.Struct(">cQII")


def outbox_path(bundle: str) -> Path:
    return state_dir(bundle) / LOG_NAME


def encode(kind: bytes, seq: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(kind, seq, len(payload), binascii.crc32(payload)) + payload


@dataclass(frozen=True)
class Parsed:
    events: list[tuple[int, bytes]]  # (seq, payload) not yet delivered, in order
    next_seq: int
    end: int  # length of the whole, valid records; anything after them is torn


def parse(data: bytes) -> Parsed:
    events: dict[int, bytes] = {}
    pos = 0
    top = -1
    while pos + _HEADER.size <= len(data):
        kind, seq, length, crc = _HEADER.unpack_from(data, pos)
        start = pos + _HEADER.size
        payload = data[start : start + length]
        if kind not in (EVENT, ACK) or len(payload) != length or binascii.crc32(payload) != crc:
            break
        if kind == EVENT:
            events[seq] = payload
        else:
            events.pop(seq, None)
        top = max(top, seq)
        pos = start + length
    return Parsed(list(events.items()), top + 1, pos)


def _open_log(path: Path, flags: int) -> int:
    # O_NOFOLLOW and the regular-file check: a symlink or fifo there was planted (we
    # never make one), and following it would append to, or block on, anything.
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RecordError(f"refusing event outbox {path}: not a regular file")
    return fd


def undelivered(bundle: str) -> list[bytes]:
    """The payloads still waiting in ``bundle``'s log, read only (for inspection)."""
    try:
        fd = _open_log(outbox_path(bundle), os.O_RDONLY)
    except FileNotFoundError:
        return []
    try:
        return [payload for _, payload in parse(read_all(fd, os.fstat(fd).st_size)).events]
    finally:
        os.close(fd)


class Outbox:
    """One container's log, held open by the only shim writing it."""

    def __init__(self, fd: int, path: Path, parsed: Parsed) -> None:
        self._fd: int | None = fd
        self.path = path
        self._size = parsed.end
        self._next_seq = parsed.next_seq
        self._pending = len(parsed.events)
        self._released = False

    @classmethod
    def open(cls, bundle: str) -> tuple[Outbox, list[tuple[int, bytes]]]:
        """The log of ``bundle`` (created if need be) and the events an earlier shim left.

        Never creates the bundle itself: containerd may have removed it already
        (FileNotFoundError then).
        """
        directory = state_dir(bundle)
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)
        make_private_dirs(directory)
        path = directory / LOG_NAME
        fd = _open_log(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            parsed = parse(read_all(fd, size))
            if parsed.end < size:
                _log.error(
                    "event outbox %s: discarding %d torn bytes after %d",
                    path,
                    size - parsed.end,
                    parsed.end,
                )
                os.ftruncate(fd, parsed.end)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path, parsed), parsed.events

    def append(self, payload: bytes) -> int | None:
        """Log an event; its sequence number, or None when it could not be written."""
        if self._fd is None:
            return None
        seq = self._next_seq
        try:
            self._write(encode(EVENT, seq, payload))
        except OSError as exc:
            _log.warning("cannot persist event in %s: %s", self.path, exc)
            return None
        self._next_seq += 1
        self._pending += 1
        return seq

    def acknowledge(self, seq: int) -> None:
        """The event ``seq`` was delivered (or given up on for good)."""
        self._pending -= 1
        if self._fd is None:
            return
        try:
            if self._pending > 0:
                self._write(encode(ACK, seq))
            else:
                os.ftruncate(self._fd, 0)
                self._size = 0
        except OSError as exc:
            # At worst the event is delivered again by a later shim.
            _log.warning("cannot mark event %d delivered in %s: %s", seq, self.path, exc)
        if self._released and self._pending == 0:
            self.close()

    def _write(self, record: bytes) -> None:
        assert self._fd is not None
        try:
            write_all(self._fd, record)
        except OSError:
            # A partial record would hide every later one from the reader.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(record)

    def release(self) -> None:
        """No more events will be logged; close once the pending ones are delivered."""
        self._released = True
        if self._pending == 0:
            self.close()

    def close(self) -> None:
        """Close now; what is pending stays in the log for a later shim."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
