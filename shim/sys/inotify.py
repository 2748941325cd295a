"""inotify instances, through shim.sys.syscalls (the stdlib has no binding).

Used by the cgroup v2 OOM watch (shim/task/oom.py) and the template's watch on its own
code (shim/boot/codewatch.py). Non-blocking: its fd goes into an event loop or poll set.
"""

from __future__ import annotations

import os
import sys

from shim.sys import syscalls

__all__ = [
    "IN_ATTRIB",
    "IN_CLOSE_WRITE",
    "IN_CREATE",
    "IN_DELETE",
    "IN_DELETE_SELF",
    "IN_IGNORED",
    "IN_ISDIR",
    "IN_MODIFY",
    "IN_MOVED_FROM",
    "IN_MOVED_TO",
    "IN_MOVE_SELF",
    "IN_ONLYDIR",
    "IN_Q_OVERFLOW",
    "Inotify",
    "parse_events",
]

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_ISDIR = 0x40000000
_HEADER = 16  # struct inotify_event: int wd; uint32 mask, cookie, len; then the name


def parse_events(data: bytes) -> list[tuple[int, int, bytes]]:
    """(wd, mask, name) of each ``struct inotify_event`` in ``data``."""
    events = []
    offset = 0
    while offset + _HEADER <= len(data):
        wd = int.from_bytes(data[offset : offset + 4], sys.byteorder, signed=True)
        mask = int.from_bytes(data[offset + 4 : offset + 8], sys.byteorder)
        length = int.from_bytes(data[offset + 12 : offset + 16], sys.byteorder)
        name = data[offset + _HEADER : offset + _HEADER + length].rstrip(b"\0")
        offset += _HEADER + length
        events.append((wd, mask, name))
    return events


class Inotify:
    """A non-blocking, close-on-exec inotify instance."""

    def __init__(self) -> None:
        self.fd = syscalls.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self.fd

    def add_watch(self, path: str, mask: int) -> int:
        return syscalls.inotify_add_watch(self.fd, path, mask)

    def rm_watch(self, wd: int) -> None:
        try:  # noqa: SIM105
            syscalls.inotify_rm_watch(self.fd, wd)
        except OSError:
            pass  # the kernel dropped the watch already (its file is gone)

    def read_events(self) -> list[tuple[int, int, bytes]]:
        """(wd, mask, name) of the events one read returns; [] when none are pending."""
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return []
        return parse_events(data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
