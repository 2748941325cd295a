"""When each part of a container's log was written, for `logs -t` and `--since`.

The shim appends the container's bytes to its log file and nothing else (output never
passes through pyshimd). pyshimd watches every log with inotify and, when one grows,
appends ``<size> <unix ns>\\n`` to ``<log>.idx``: the bytes before ``size`` were written
by that time. A line's time is that of the first entry at or past its end. While
pyshimd is down nothing is indexed; when it comes back the log's mtime (its last write)
stands for everything written meanwhile. This is the writer; manager.logtimes reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from manager.logtimes import index_path, read_index

log = logging.getLogger("pyshimd")

IN_MODIFY = 0x00000002
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")


@dataclass
class _Watched:
    log_path: Path
    index_fd: int
    size: int


class LogIndexer:
    """One inotify instance for every container log; runs on pyshimd's loop."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._fd: int = fd
        self._by_wd: dict[int, _Watched] = {}
        self._by_path: dict[Path, int] = {}
        asyncio.get_running_loop().add_reader(self._fd, self._readable)

    def watch(self, log_path: Path) -> None:
        if log_path in self._by_path or self._fd < 0:
            return
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(log_path), IN_MODIFY)
        if wd < 0:
            err = ctypes.get_errno()
            log.warning("cannot index %s: %s", log_path, os.strerror(err))
            return
        index_fd = os.open(
            index_path(log_path), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640
        )
        indexed = _last_indexed(index_path(log_path))
        w = _Watched(log_path, index_fd, indexed)
        self._by_wd[wd] = w
        self._by_path[log_path] = wd
        try:
            st = log_path.stat()
        except OSError:
            return
        if st.st_size > indexed:
            # Written while nobody was indexing: its last write is all we know.
            self._append(w, st.st_size, st.st_mtime_ns)

    def unwatch(self, log_path: Path) -> None:
        wd = self._by_path.pop(log_path, None)
        if wd is None:
            return
        w = self._by_wd.pop(wd)
        self._libc.inotify_rm_watch(self._fd, wd)
        os.close(w.index_fd)

    def close(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._fd)
        for path in list(self._by_path):
            self.unwatch(path)
        os.close(self._fd)
        self._fd = -1

    def _append(self, w: _Watched, size: int, at_ns: int) -> None:
        w.size = size
        try:
            os.write(w.index_fd, f"{size} {at_ns}\n".encode())
        except OSError as exc:
            log.warning("log index of %s: %s", w.log_path, exc)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        now = time.time_ns()
        grown: set[int] = set()
        off = 0
        while off + _EVENT.size <= len(data):
            wd, _mask, _cookie, name_len = _EVENT.unpack_from(data, off)
            grown.add(wd)
            off += _EVENT.size + name_len
        # One entry per log per wake-up, however many writes it coalesced.
        for wd in grown:
            w = self._by_wd.get(wd)
            if w is None:
                continue
            try:
                size = os.stat(w.log_path).st_size
            except OSError:
                continue
            if size > w.size:
                self._append(w, size, now)


def _last_indexed(path: str) -> int:
    entries = read_index(path)
    return entries[-1][0] if entries else 0
