"""Records the shim persists in ``<bundle>/pyshim/`` so exits survive a shim restart.

Every record is a msgspec Struct with a ``version`` field; a reader refuses a version
it does not know instead of guessing. Writes are atomic (tmp file, rename), so a crash
never leaves a torn record, and by default durable too (fsync of the file before the
rename and of the directory after it): an exit is on disk before anyone is told about it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import TypeVar

import msgspec

from shim.fdio import write_all
from shim.ids import validate_id
from shim.recordfile import RecordError, read_regular_file

__all__ = [
    "EXIT_RECORD_VERSION",
    "ExitRecord",
    "RecordError",
    "UnsafePathError",
    "exit_record_path",
    "make_private_dirs",
    "read_record",
    "state_dir",
    "write_atomic",
    "write_record",
]

EXIT_RECORD_VERSION = 1
STATE_DIR_NAME = "pyshim"

T = TypeVar("T", bound=msgspec.Struct)


class ExitRecord(msgspec.Struct, kw_only=True):
    version: int = EXIT_RECORD_VERSION
    container_id: str
    exec_id: str  # "" for the init process
    pid: int
    exit_status: int
    exited_at_ns: int


class UnsafePathError(OSError):
    """A state path leads through something other than a real directory."""


class _Versioned(msgspec.Struct):
    version: int


def state_dir(bundle: str) -> Path:
    return Path(bundle) / STATE_DIR_NAME


def exit_record_path(bundle: str, process_id: str) -> Path:
    """``<bundle>/pyshim/exits/<process_id>.json``; refuses ids that could escape it."""
    validate_id("process id", process_id)
    return state_dir(bundle) / "exits" / f"{process_id}.json"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` like ``mkdir -p``, refusing symlinks inside the state dir.

    Every component from the nearest ``pyshim`` ancestor down (or just ``directory``
    when there is none) must be a real directory: a symlink planted there would send
    our root-owned writes anywhere. Components above it (the bundle path) may be
    symlinks; hosts do link /var/lib/containerd elsewhere.
    """
    parts = list(directory.parts)
    try:
        top = len(parts) - 1 - parts[::-1].index(STATE_DIR_NAME)
    except ValueError:
        top = len(parts) - 1
    made_parents = False
    for i in range(top, len(parts)):
        current = Path(*parts[: i + 1])
        # lstat first: on every write but the first the directories exist already.
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            if not made_parents:
                Path(*parts[:top]).mkdir(mode=0o700, parents=True, exist_ok=True)
                made_parents = True
            with contextlib.suppress(FileExistsError):
                os.mkdir(current, 0o700)
            st = os.lstat(current)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(f"refusing to write state through {current}: not a directory")


def write_atomic(path: Path, data: bytes, mode: int = 0o600, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old or the new file, never half.

    ``durable=False`` skips both fsyncs: the file then survives the death of any
    process (the page cache keeps it) but not a kernel crash or power loss, after
    which it may be missing or empty. For data nobody needs after a reboot.
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
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(directory)


def write_record(path: Path, record: msgspec.Struct, *, durable: bool = True) -> None:
    write_atomic(path, msgspec.json.encode(record) + b"\n", durable=durable)


def _current_version(type_: type[msgspec.Struct]) -> int:
    for field in msgspec.structs.fields(type_):
        if field.name == "version" and isinstance(field.default, int):
            return field.default
    raise TypeError(f"{type_.__name__} has no default int 'version' field")


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
    expected = _current_version(type_)
    try:
        version = msgspec.json.decode(data, type=_Versioned).version
    except msgspec.DecodeError as exc:
        raise RecordError(f"corrupt record {path}: {exc}") from exc
    if version != expected:
        raise RecordError(
            f"record {path} has version {version}; this shim reads version {expected}"
        )
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.DecodeError as exc:
        raise RecordError(f"corrupt record {path}: {exc}") from exc
