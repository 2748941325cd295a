"""Append-only logs of small records in a bundle's state dir: ``<bundle>/pyshim/<name>``.

What must outlive the shim on its hot paths lives in one: the event outbox
(shim/events.py) and the exit records (shim/records/state.py). Appending to an open file
costs ~1 µs, ~0.15 ms when synced; a file per record costs 0.2-0.7 ms to create,
rename, sync and later unlink (bench/README.md, "Sixth round").

Records, big-endian: kind (1 byte: ``R`` a record, ``D`` the record with that sequence
number is done with), sequence number (8), payload length (4), CRC-32 of the payload
(4), payload (empty for ``D``). What a log holds is its records in order minus the
done ones. A reader stops at the first record that is cut short or fails its
checksum: what a kernel crash can leave of appends not yet synced. Once nothing is
left the file is truncated to empty, so it stays small.

The framing (``encode``, ``parse``) is pure; ``RecordLog`` is the open file, created
on the first append (a bundle whose container never got that far gets no file).
The `delete` subcommand reads exit records through ``read_live``, so this module
imports nothing beyond what that costs (no logging, dataclasses, pathlib or msgspec):
callers log what goes wrong.
"""

from __future__ import annotations

import binascii
import errno
import os
import stat
import struct

from shim.records.recordfile import RecordError
from shim.records.statedir import STATE_DIR_NAME, fsync_dir, make_private_dirs
from shim.sys.fdio import read_all, write_all

__all__ = ["DONE", "RECORD", "Parsed", "RecordLog", "encode", "log_path", "parse", "read_live"]

RECORD = b"R"
DONE = b"D"
_HEADER = struct.Struct(">cQII")


def log_path(bundle: str, name: str) -> str:
    return os.path.join(bundle, STATE_DIR_NAME, name)


def encode(kind: bytes, seq: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(kind, seq, len(payload), binascii.crc32(payload)) + payload


class Parsed:
    __slots__ = ("end", "live", "next_seq")

    def __init__(self, live: list[tuple[int, bytes]], next_seq: int, end: int) -> None:
        self.live = live  # (seq, payload) of the records not done with, in order
        self.next_seq = next_seq
        self.end = end  # length of the whole, valid records; anything after is torn


def parse(data: bytes) -> Parsed:
    live: dict[int, bytes] = {}
    pos = 0
    top = -1
    while pos + _HEADER.size <= len(data):
        kind, seq, length, crc = _HEADER.unpack_from(data, pos)
        start = pos + _HEADER.size
        payload = data[start : start + length]
        if kind not in (RECORD, DONE) or len(payload) != length or binascii.crc32(payload) != crc:
            break
        if kind == RECORD:
            live[seq] = payload
        else:
            live.pop(seq, None)
        top = max(top, seq)
        pos = start + length
    return Parsed(list(live.items()), top + 1, pos)


def _open(path: str, flags: int) -> int:
    # O_NOFOLLOW and the regular-file check: a symlink or fifo there was planted (we
    # never make one), and following it would write to, or block on, anything.
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RecordError(f"refusing record log {path}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read(fd: int) -> tuple[Parsed, int]:
    size = os.fstat(fd).st_size
    return parse(read_all(fd, size)), size


def read_live(path: str) -> list[tuple[int, bytes]]:
    """The live records of the log at ``path``, read only; [] when there is none."""
    try:
        fd = _open(path, os.O_RDONLY)
    except FileNotFoundError:
        return []
    try:
        return _read(fd)[0].live
    finally:
        os.close(fd)


class RecordLog:
    """One log, written by the one shim that owns its bundle.

    ``durable``: an append returns once the record is on disk (fdatasync; the
    directory is synced when the file is created). Otherwise records survive the death
    of any process (the page cache keeps them) but not a kernel crash.
    """

    def __init__(self, path: str, *, durable: bool = False) -> None:
        self.path = path
        self._durable = durable
        self._fd: int | None = None
        self._size = 0
        self._next_seq = 0
        self._live = 0
        self._released = False
        self._closed = False
        # Bytes load() cut off after the last whole record, for the caller to report.
        self.torn = 0

    @classmethod
    def load(
        cls, bundle: str, name: str, *, durable: bool = False
    ) -> tuple[RecordLog, list[tuple[int, bytes]]]:
        """The log ``name`` of ``bundle`` and the live records an earlier shim left.

        A torn tail is cut off, so what is appended next stays readable. Raises
        RecordError (or OSError) for a log that is not a regular file.
        """
        log = cls(log_path(bundle, name), durable=durable)
        try:
            fd = _open(log.path, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            return log, []
        try:
            parsed, size = _read(fd)
            if parsed.end < size:
                os.ftruncate(fd, parsed.end)
                log.torn = size - parsed.end
        except BaseException:
            os.close(fd)
            raise
        log._fd, log._size, log._next_seq = fd, parsed.end, parsed.next_seq
        log._live = len(parsed.live)
        return log, parsed.live

    def _file(self) -> int:
        if self._fd is None:
            if self._closed:
                raise OSError(errno.EBADF, f"record log {self.path} is closed")
            directory = os.path.dirname(self.path)
            # Never creates the bundle itself (FileNotFoundError): containerd may have
            # removed it already.
            try:  # noqa: SIM105 (contextlib costs `delete` ~3 ms to import)
                os.mkdir(directory, 0o700)
            except FileExistsError:
                pass
            make_private_dirs(directory)
            fd = _open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
            try:
                # Records already there (this object did not load them) stay someone
                # else's; ours are numbered after them and appended after whole ones.
                parsed, size = _read(fd)
                if parsed.end < size:
                    os.ftruncate(fd, parsed.end)
                if self._durable:
                    fsync_dir(directory)
            except BaseException:
                os.close(fd)
                raise
            self._fd, self._size, self._next_seq = fd, parsed.end, parsed.next_seq
        return self._fd

    def append(self, payload: bytes) -> int:
        """Add a record; its sequence number. Raises OSError when it could not be written
        (and leaves no part of it behind)."""
        fd = self._file()
        seq = self._next_seq
        self._write(fd, encode(RECORD, seq, payload))
        self._next_seq += 1
        self._live += 1
        if self._durable:
            os.fdatasync(fd)
        return seq

    def done(self, seq: int) -> None:
        """The record ``seq`` is no longer needed. Never synced; raises OSError when it
        could not be marked (at worst a later shim then sees the record again)."""
        self._live -= 1
        fd = self._fd
        try:
            if fd is not None and self._live > 0:
                self._write(fd, encode(DONE, seq))
            elif fd is not None:
                os.ftruncate(fd, 0)
                self._size = 0
        finally:
            if self._released and self._live == 0:
                self.close()

    def _write(self, fd: int, record: bytes) -> None:
        try:
            write_all(fd, record)
        except OSError:
            # A partial record would hide every later one from the reader.
            try:  # noqa: SIM105 (no contextlib: see the module docstring)
                os.ftruncate(fd, self._size)
            except OSError:
                pass
            raise
        self._size += len(record)

    def release(self) -> None:
        """Nothing more will be appended; close once every record is done with."""
        self._released = True
        if self._live == 0:
            self.close()

    def close(self) -> None:
        """Close now; live records stay in the file for a later shim."""
        self._closed = True
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
