"""Reading a persisted record's bytes without following anything planted.

Kept apart from shim.records.state (msgspec) so that the `delete` subcommand, which runs
once per container, can read exit records without paying for msgspec's import.
"""

from __future__ import annotations

import os
import stat


class RecordError(ValueError):
    """A record file exists but cannot be used (corrupt, or a version we do not know)."""


def read_regular_file(path: str | os.PathLike[str]) -> bytes | None:
    """The bytes of the regular file at ``path``; None when there is none.

    The writer never makes a symlink or anything but a regular file, so such a thing
    was planted: a symlink fails the open (OSError, ELOOP) instead of handing us, as
    root, any file's contents, and a fifo is refused (RecordError) instead of
    blocking the read forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RecordError(f"refusing record {os.fspath(path)}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)
