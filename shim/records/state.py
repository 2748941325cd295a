"""Records the shim persists in ``<bundle>/pyshim/`` so exits survive a shim restart.

Every record is a msgspec Struct with a ``version`` field; a reader refuses a version
it does not know instead of guessing.

Exit records go to the container's log ``exits.log`` (shim/records/recordlog.py), synced
(fdatasync) before the append returns: an exit is on disk before anyone is told about
it. An exec's record is marked done when the exec is deleted; the init's stays for the
`delete` subcommand. Other records are whole files written atomically (tmp file,
rename), so a crash never leaves a torn one, and not synced: they are for a shim
restarted after a process crash, which the page cache survives.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path
from typing import TypeVar

import msgspec

from shim.records.recordfile import RecordError, read_regular_file
from shim.records.recordlog import RecordLog, log_path
from shim.records.statedir import (
    EXIT_LOG,
    EXIT_RECORD_VERSION,
    LEGACY_EXITS_DIR,
    STATE_DIR_NAME,
    make_private_dirs,
)
from shim.sys.fdio import write_all

__all__ = [
    "ExitLog",
    "ExitRecord",
    "RecordError",
    "decode_record",
    "read_record",
    "state_dir",
    "write_atomic",
    "write_record",
]


T = TypeVar("T", bound=msgspec.Struct)
_log = logging.getLogger("shim.records.state")


class ExitRecord(msgspec.Struct, kw_only=True):
    version: int = EXIT_RECORD_VERSION
    container_id: str
    exec_id: str  # "" for the init process
    pid: int
    exit_status: int
    exited_at_ns: int


class _Versioned(msgspec.Struct):
    version: int


class _Owner(msgspec.Struct):
    """Whose exit a record is, readable whatever its version."""

    container_id: str = ""
    exec_id: str = ""


def state_dir(bundle: str) -> Path:
    return Path(bundle) / STATE_DIR_NAME


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old or the new file, never half.

    Not synced: the file survives the death of any process (the page cache keeps it)
    but not a kernel crash or power loss, after which it may be missing or empty.
    """
    directory = path.parent
    make_private_dirs(directory)
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    # A leftover (or planted) tmp name is removed, never followed: O_EXCL + O_NOFOLLOW
    # make the open fail rather than truncate whatever a symlink there points to.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_record(path: Path, record: msgspec.Struct) -> None:
    write_atomic(path, msgspec.json.encode(record) + b"\n")


def _current_version(type_: type[msgspec.Struct]) -> int:
    for field in msgspec.structs.fields(type_):
        if field.name == "version" and isinstance(field.default, int):
            return field.default
    raise TypeError(f"{type_.__name__} has no default int 'version' field")


def decode_record(data: bytes, type_: type[T], origin: object) -> T:
    """The record in ``data`` (from ``origin``, named in errors); ``RecordError`` when
    unusable: corrupt, or of a version this shim does not know."""
    expected = _current_version(type_)
    try:
        version = msgspec.json.decode(data, type=_Versioned).version
    except msgspec.DecodeError as exc:
        raise RecordError(f"corrupt record {origin}: {exc}") from exc
    if version != expected:
        raise RecordError(
            f"record {origin} has version {version}; this shim reads version {expected}"
        )
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.DecodeError as exc:
        raise RecordError(f"corrupt record {origin}: {exc}") from exc


def read_record(path: Path, type_: type[T]) -> T | None:
    """The record at ``path``; None when there is none; ``RecordError`` when unusable.

    A symlink or non-regular file at ``path`` is refused, never followed: the writer
    never makes one, so it was planted, and following it would hand us (as root) any
    file's contents, or a fifo that blocks the read forever.
    """
    try:
        data = read_regular_file(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RecordError(f"refusing record {path}: it is a symlink") from exc
        raise
    if data is None:
        return None
    return decode_record(data, type_, path)


def _process_id(container_id: str, exec_id: str) -> str:
    return exec_id or container_id


class ExitLog:
    """A container's exit records, in ``<bundle>/pyshim/exits.log``."""

    def __init__(self, bundle: str, log: RecordLog | None = None) -> None:
        self.bundle = bundle
        self._log = log or RecordLog(log_path(bundle, EXIT_LOG), durable=True)
        self._seqs: dict[str, int] = {}

    @classmethod
    def load(cls, bundle: str, container_id: str) -> tuple[ExitLog, dict[str, ExitRecord]]:
        """What a shim taking the container over finds: the log, and the exits in it by
        process id (including those a shim from before the log left as files, which
        move into it).

        Raises ``RecordError`` when the init's record is unusable: better no container
        than a misread exit. An unusable exec record is skipped (logged): one exec must
        not cost the container.
        """
        log, live = RecordLog.load(bundle, EXIT_LOG, durable=True)
        if log.torn:
            _log.error("exit log %s: discarded %d torn bytes", log.path, log.torn)
        exits = cls(bundle, log)
        try:
            records = exits._decode(live, container_id)
            exits._adopt_legacy(container_id, records)
        except BaseException:
            exits.close()
            raise
        return exits, records

    def _decode(self, live: list[tuple[int, bytes]], container_id: str) -> dict[str, ExitRecord]:
        latest: dict[str, tuple[int, bytes]] = {}
        for seq, payload in live:
            try:
                owner = msgspec.json.decode(payload, type=_Owner)
            except msgspec.DecodeError:
                continue  # whose it is cannot be told: no process's record
            if owner.container_id == container_id:
                latest[_process_id(owner.container_id, owner.exec_id)] = seq, payload
        records: dict[str, ExitRecord] = {}
        for process_id, (seq, payload) in latest.items():
            origin = f"{self._log.path} #{seq}"
            try:
                record = decode_record(payload, ExitRecord, origin)
            except RecordError:
                if process_id == container_id:
                    raise
                _log.warning("skipping exit record %s: unusable", origin)
                continue
            records[process_id] = record
            self._seqs[process_id] = seq
        return records

    def _adopt_legacy(self, container_id: str, records: dict[str, ExitRecord]) -> None:
        legacy = state_dir(self.bundle) / LEGACY_EXITS_DIR
        try:
            names = sorted(n for n in os.listdir(legacy) if n.endswith(".json") and n[0] != ".")
        except FileNotFoundError:
            return
        init_name = f"{container_id}.json"
        for name in names:
            path = legacy / name
            try:
                record = read_record(path, ExitRecord)
            except RecordError:
                if name == init_name:
                    raise
                _log.warning("skipping exit record %s: unusable", path)
                continue  # left where it is
            if record is not None and record.container_id == container_id:
                process_id = _process_id(record.container_id, record.exec_id)
                if process_id not in records:
                    records[process_id] = record
                    try:
                        self.record(record)
                    except OSError as exc:
                        _log.warning("cannot move exit record %s into the log: %s", path, exc)
                        continue  # read from the file again next time
            with contextlib.suppress(OSError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            legacy.rmdir()

    def record(self, record: ExitRecord) -> None:
        """Append ``record``, on disk when this returns; raises OSError if it is not."""
        process_id = _process_id(record.container_id, record.exec_id)
        seq = self._log.append(msgspec.json.encode(record))
        old = self._seqs.get(process_id)
        self._seqs[process_id] = seq
        if old is not None:
            with contextlib.suppress(OSError):  # the newer record wins on reading
                self._log.done(old)

    def forget(self, process_id: str) -> None:
        """A deleted exec's record: a later shim must not bring the exec back."""
        seq = self._seqs.pop(process_id, None)
        if seq is not None:
            try:
                self._log.done(seq)
            except OSError as exc:
                _log.warning("cannot drop the exit record of %s: %s", process_id, exc)

    def close(self) -> None:
        self._log.close()
