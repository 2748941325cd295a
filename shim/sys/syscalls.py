"""The few raw Linux syscalls the shim needs that ``os`` does not offer, via ctypes.

Every wrapper raises ``OSError`` with the real errno (libc is loaded with
``use_errno=True``) so callers can branch on EINVAL/EBUSY/ENOENT like with ``os``.
"""

from __future__ import annotations

import ctypes
import os
import signal as _signal

TYPE_CHECKING = False  # typing costs ~3 ms at start-up; mypy honours this name

if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "MM_MAP_FIELDS",
    "MNT_DETACH",
    "MS_BIND",
    "MS_DIRSYNC",
    "MS_MANDLOCK",
    "MS_NOATIME",
    "MS_NODEV",
    "MS_NODIRATIME",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_RDONLY",
    "MS_REC",
    "MS_RELATIME",
    "MS_REMOUNT",
    "MS_STRICTATIME",
    "MS_SYNCHRONOUS",
    "PR_SET_CHILD_SUBREAPER",
    "PR_SET_PDEATHSIG",
    "eventfd",
    "get_child_subreaper",
    "inotify_add_watch",
    "inotify_init1",
    "inotify_rm_watch",
    "load_libc",
    "malloc_trim",
    "mount",
    "prctl",
    "prctl_mm_map",
    "set_child_subreaper",
    "set_pdeathsig",
    "umount2",
]

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000

MNT_DETACH = 0x2

# struct prctl_mm_map's leading fields, in order, with their /proc/<pid>/stat field
# numbers (0: not in stat).
MM_MAP_FIELDS = {
    "start_code": 26,
    "end_code": 27,
    "start_data": 45,
    "end_data": 46,
    "start_brk": 47,
    "brk": 0,
    "start_stack": 28,
    "arg_start": 0,
    "arg_end": 0,
    "env_start": 0,
    "env_end": 0,
}

_libc: ctypes.CDLL | None = None

# The libc functions called, with their prototypes: (argtypes, restype).
_c_int, _c_uint, _c_ulong, _c_char_p = ctypes.c_int, ctypes.c_uint, ctypes.c_ulong, ctypes.c_char_p
_SIGNATURES: dict[str, tuple[tuple[Any, ...], Any]] = {
    "prctl": ((_c_int, _c_ulong, _c_ulong, _c_ulong, _c_ulong), _c_int),
    "madvise": ((ctypes.c_void_p, ctypes.c_size_t, _c_int), _c_int),
    "malloc_trim": ((ctypes.c_size_t,), _c_int),
    "mount": ((_c_char_p, _c_char_p, _c_char_p, _c_ulong, _c_char_p), _c_int),
    "umount2": ((_c_char_p, _c_int), _c_int),
    "eventfd": ((_c_uint, _c_int), _c_int),
    "inotify_init1": ((_c_int,), _c_int),
    "inotify_add_watch": ((_c_int, _c_char_p, ctypes.c_uint32), _c_int),
    "inotify_rm_watch": ((_c_int, _c_int), _c_int),
}
_funcs: dict[str, Any] = {}


def load_libc() -> None:
    """Load libc and set up every function now, e.g. before fork: dlopen in a forked
    child can deadlock, and a daemon forked from the template shares the set-up
    instead of building it into its own memory on its first call."""
    for name in _SIGNATURES:
        _func(name)


def _func(name: str) -> Any:
    """libc's ``name`` with its prototype; None where this libc has no such function."""
    fn = _funcs.get(name)
    if fn is None and name not in _funcs:
        fn = getattr(_lib(), name, None)
        if fn is not None:
            fn.argtypes, fn.restype = _SIGNATURES[name]
        _funcs[name] = fn
    return fn


def _lib() -> ctypes.CDLL:
    # Loaded on first use: processes that never make these calls pay nothing.
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:
            # Not glibc: ask the slower lookup (it imports subprocess, hence the order).
            from ctypes.util import find_library

            _libc = ctypes.CDLL(find_library("c"), use_errno=True)
    return _libc


def _check(result: int, what: str, path: str | None = None) -> int:
    if result == -1:
        err = ctypes.get_errno()
        if path is None:
            raise OSError(err, f"{what}: {os.strerror(err)}")
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return result


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_func("prctl")(option, arg2, arg3, arg4, arg5), "prctl")


def madvise(address: int, length: int, advice: int) -> None:
    _check(_func("madvise")(address, length, advice), "madvise")


def malloc_trim() -> bool:
    """Give the C heap's free pages back to the kernel (glibc's malloc_trim(0)): whether
    anything was released. False where the C library has no such call (not glibc)."""
    fn = _func("malloc_trim")
    return fn is not None and bool(fn(0))


def set_child_subreaper(enabled: bool = True) -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1 if enabled else 0)


def get_child_subreaper() -> bool:
    value = ctypes.c_int(0)
    # The kernel takes the int pointer as an unsigned long argument.
    prctl(PR_GET_CHILD_SUBREAPER, ctypes.addressof(value))
    return value.value != 0


def set_pdeathsig(sig: int = _signal.SIGKILL) -> None:
    prctl(PR_SET_PDEATHSIG, int(sig))


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str | None = None) -> None:
    result = _func("mount")(
        os.fsencode(source),
        os.fsencode(target),
        os.fsencode(fstype),
        flags,
        None if data is None else data.encode(),
    )
    _check(result, f"mount {source!r} on {target!r} ({fstype})", target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_func("umount2")(os.fsencode(target), flags), "umount2", target)


def eventfd(initval: int = 0, flags: int = 0) -> int:
    """An eventfd (cgroup v1 OOM notification registers one); ``os.eventfd`` when present."""
    native = getattr(os, "eventfd", None)
    if native is not None:
        fd: int = native(initval, flags)
        return fd
    return _check(_func("eventfd")(initval, flags), "eventfd")


def inotify_init1(flags: int = 0) -> int:
    return _check(_func("inotify_init1")(flags), "inotify_init1")


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    """The watch descriptor for ``path`` (the same one again for an inode already watched)."""
    return _check(
        _func("inotify_add_watch")(fd, os.fsencode(path), mask), "inotify_add_watch", path
    )


def inotify_rm_watch(fd: int, wd: int) -> None:
    _check(_func("inotify_rm_watch")(fd, wd), "inotify_rm_watch")


_mm_map_tools: list[Any] = []


def prctl_mm_map() -> tuple[Any, Any]:
    """struct prctl_mm_map and syscall(2), built once: in the template before its freeze
    (shim.boot.prefork), so every daemon shares them."""
    if not _mm_map_tools:
        u64 = ctypes.c_uint64

        class MmMap(ctypes.Structure):  # struct prctl_mm_map, <linux/prctl.h>
            _fields_ = [
                *((name, u64) for name in MM_MAP_FIELDS),
                ("auxv", u64),
                ("auxv_size", ctypes.c_uint32),
                ("exe_fd", ctypes.c_uint32),
            ]

        syscall = ctypes.CDLL(None, use_errno=True).syscall
        syscall.restype = ctypes.c_long
        _mm_map_tools.extend((MmMap, syscall))
    return _mm_map_tools[0], _mm_map_tools[1]
