"""Rootfs mounts from ``containerd.types.Mount`` messages (io.md §4).

Not supported yet, with a clear error: ``loop`` mounts, ``fuse.``/``fuse3.`` helper
mounts, and overlay mounts whose options are too long for one page (containerd
rewrites the lowerdirs as relative paths and mounts from a helper process; we do not).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shim.sys import syscalls

if TYPE_CHECKING:
    from protocol.proto.types import mount_pb2

__all__ = [
    "MountError",
    "ParsedOptions",
    "mount_all",
    "parse_options",
    "unmount_all",
]

PAGE_SIZE = os.sysconf("SC_PAGESIZE")
# containerd switches to its relative-lowerdir helper above this much overlay data.
_OVERLAY_LIMIT = PAGE_SIZE - 512

_UNMOUNT_BUSY_RETRIES = 50
_UNMOUNT_BUSY_DELAY = 0.05

# option -> (clear?, flag). "defaults" is deliberately absent: containerd keeps the
# word in the data string, and so do we.
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, syscalls.MS_SYNCHRONOUS),
    "atime": (True, syscalls.MS_NOATIME),
    "bind": (False, syscalls.MS_BIND),
    "dev": (True, syscalls.MS_NODEV),
    "diratime": (True, syscalls.MS_NODIRATIME),
    "dirsync": (False, syscalls.MS_DIRSYNC),
    "exec": (True, syscalls.MS_NOEXEC),
    "mand": (False, syscalls.MS_MANDLOCK),
    "noatime": (False, syscalls.MS_NOATIME),
    "nodev": (False, syscalls.MS_NODEV),
    "nodiratime": (False, syscalls.MS_NODIRATIME),
    "noexec": (False, syscalls.MS_NOEXEC),
    "nomand": (True, syscalls.MS_MANDLOCK),
    "norelatime": (True, syscalls.MS_RELATIME),
    "nostrictatime": (True, syscalls.MS_STRICTATIME),
    "nosuid": (False, syscalls.MS_NOSUID),
    "rbind": (False, syscalls.MS_BIND | syscalls.MS_REC),
    "relatime": (False, syscalls.MS_RELATIME),
    "remount": (False, syscalls.MS_REMOUNT),
    "ro": (False, syscalls.MS_RDONLY),
    "rw": (True, syscalls.MS_RDONLY),
    "strictatime": (False, syscalls.MS_STRICTATIME),
    "suid": (True, syscalls.MS_NOSUID),
    "sync": (False, syscalls.MS_SYNCHRONOUS),
}

_BIND_RO = syscalls.MS_BIND | syscalls.MS_RDONLY


class MountError(OSError):
    """A rootfs mount that failed or that pyshim cannot perform."""


@dataclass(frozen=True)
class ParsedOptions:
    flags: int
    data: str
    loop: bool


def parse_options(options: Sequence[str]) -> ParsedOptions:
    flags = 0
    data: list[str] = []
    loop = False
    for option in options:
        known = _FLAGS.get(option)
        if known is not None:
            clear, flag = known
            flags = flags & ~flag if clear else flags | flag
        elif option == "loop":
            loop = True
        else:
            data.append(option)
    return ParsedOptions(flags, ",".join(data), loop)


def _destination(root: str, relative: str) -> str:
    if not relative:
        return root
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise MountError(errno.EINVAL, f"mount target {relative!r} escapes the rootfs")
    return os.path.join(root, *parts)


def _mount_one(m: mount_pb2.Mount, target: str) -> None:
    opts = parse_options(list(m.options))
    if opts.loop:
        raise MountError(errno.ENOTSUP, f"loop mounts are not supported by pyshim ({m.source})")
    if m.type.startswith(("fuse.", "fuse3.")):
        raise MountError(errno.ENOTSUP, f"mount type {m.type!r} is not supported by pyshim")
    if len(opts.data) >= PAGE_SIZE:
        raise MountError(errno.EINVAL, "mount options is too long")
    if m.type == "overlay" and len(opts.data) >= _OVERLAY_LIMIT:
        raise MountError(
            errno.ENOTSUP,
            f"overlay mount options too long ({len(opts.data)} bytes) for pyshim",
        )
    try:
        syscalls.mount(m.source, target, m.type, opts.flags, opts.data or None)
    except OSError as exc:
        raise MountError(
            exc.errno, f"failed to mount {m.source} on {target} ({m.type}): {exc.strerror}"
        ) from exc
    if opts.flags & _BIND_RO == _BIND_RO:
        # A bind mount ignores MS_RDONLY on its first mount(2); only a remount applies it.
        try:
            syscalls.mount("", target, "", opts.flags | syscalls.MS_REMOUNT, None)
        except OSError as exc:
            _detach(target)
            raise MountError(
                exc.errno, f"failed to remount {target} read-only: {exc.strerror}"
            ) from exc


def _detach(target: str) -> None:
    with contextlib.suppress(OSError):
        syscalls.umount2(target, syscalls.MNT_DETACH)


def mount_all(mounts: Sequence[mount_pb2.Mount], target: str) -> None:
    """Mount each in order (1.6: all at ``target``); on failure undo the ones done."""
    done: list[str] = []
    try:
        for m in mounts:
            dest = _destination(target, m.target)
            _mount_one(m, dest)
            done.append(dest)
    except BaseException:
        for dest in reversed(done):
            _detach(dest)
        raise


def unmount_all(target: str) -> None:
    """Unmount everything stacked on ``target`` until it is no mount point."""
    busy = 0
    while True:
        try:
            syscalls.umount2(target, 0)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return
            if exc.errno == errno.EBUSY and busy < _UNMOUNT_BUSY_RETRIES:
                busy += 1
                time.sleep(_UNMOUNT_BUSY_DELAY)
                continue
            raise MountError(exc.errno, f"failed to unmount {target}: {exc.strerror}") from exc
