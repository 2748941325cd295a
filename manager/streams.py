"""Moving bytes for the CLI: tail a container's log file, feed its stdin fifo.

Output never passes through pyshimd: the shim appends to the log file and we read it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio
    from os import PathLike

    from manager.logtimes import LineTimes

# Only while following: how often a quiet log is looked at again.
POLL_INTERVAL = 0.05
CHUNK = 65536


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


def rfc3339_ns(ns: int) -> str:
    """docker's `logs -t` format: 2026-12-06T20:48:01.123456789Z."""
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


class LogTail:
    """Copies a log file to ``out_fd``; with ``times``, line by line, each stamped
    (``timestamps``) and/or kept only if written at or after ``since_ns``."""

    def __init__(
        self,
        path: str | PathLike[str],
        out_fd: int,
        *,
        from_end: bool = False,
        times: LineTimes | None = None,
        timestamps: bool = False,
        since_ns: int = 0,
    ) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        if from_end:
            self._f.seek(0, os.SEEK_END)
        self._out = out_fd
        self._times = times
        self._timestamps = timestamps
        self._since = since_ns
        self._partial = b""

    def _emit(self, line: bytes, end_offset: int) -> None:
        assert self._times is not None
        at = self._times.at(end_offset)
        if at < self._since:
            return
        if self._timestamps:
            line = rfc3339_ns(at).encode() + b" " + line
        _write_all(self._out, line)

    def _lines(self, data: bytes) -> None:
        buf = self._partial + data
        start = self._f.tell() - len(buf)
        pos = 0
        while (nl := buf.find(b"\n", pos)) >= 0:
            self._emit(buf[pos : nl + 1], start + nl + 1)
            pos = nl + 1
        self._partial = buf[pos:]

    def flush(self) -> None:
        """The last line, written without its newline (yet)."""
        if self._times is not None and self._partial:
            self._emit(self._partial + b"\n", self._f.tell())
            self._partial = b""

    def seek_last_lines(self, count: int) -> None:
        """Start ``count`` lines before the end (a last line without its newline counts)."""
        end = self._f.seek(0, os.SEEK_END)
        if count == 0:
            return
        pos = end
        need = count
        while pos > 0:
            step = min(CHUNK, pos)
            pos -= step
            self._f.seek(pos)
            chunk = self._f.read(step)
            i = len(chunk)
            while (i := chunk.rfind(b"\n", 0, i)) >= 0:
                # A newline as the very last byte ends the last line, starts none.
                if pos + i == end - 1:
                    continue
                need -= 1
                if need == 0:
                    self._f.seek(pos + i + 1)
                    return
        self._f.seek(0)

    def pump(self) -> int:
        """Copy whatever is new; returns how many bytes."""
        total = 0
        while True:
            data = self._f.read(CHUNK)
            if not data:
                return total
            if self._times is None:
                _write_all(self._out, data)
            else:
                self._lines(data)
            total += len(data)

    async def follow(self, done: asyncio.Event) -> None:
        """Until ``done``; then until the file has been quiet for a moment."""
        import asyncio  # here: the blocking CLI copies with pump() and never needs it

        while not done.is_set():
            if not self.pump():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), POLL_INTERVAL)
        # The shim drains a process's output into the log before it reports the exit
        # (up to its own drain timeout), so what is there now is all there is.
        self.pump()
        self.flush()

    def close(self) -> None:
        self._f.close()


async def open_fifo_writer(path: str, timeout: float = 10.0) -> int:
    """O_NONBLOCK open fails with ENXIO until the shim has its reader: retry, bounded."""
    import asyncio

    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.ENXIO or loop.time() > end:
                raise
            await asyncio.sleep(POLL_INTERVAL)
            continue
        os.set_blocking(fd, True)
        return fd


async def forward_stdin(in_fd: int, fifo: str, on_eof: Callable[[], Awaitable[None]]) -> None:
    """User's stdin -> the container's stdin fifo; at EOF close it and tell the shim."""
    import asyncio

    out = await open_fifo_writer(fifo)
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    try:
        loop.add_reader(in_fd, readable.set)
    except (PermissionError, ValueError, OSError):
        # A regular file or /dev/null can't be polled; read it in a worker instead.
        try:
            while data := await asyncio.to_thread(os.read, in_fd, CHUNK):
                await asyncio.to_thread(_write_all, out, data)
        finally:
            os.close(out)
        await on_eof()
        return
    try:
        while True:
            await readable.wait()
            readable.clear()
            try:
                data = os.read(in_fd, CHUNK)
            except BlockingIOError:
                continue
            if not data:
                break
            await asyncio.to_thread(_write_all, out, data)
    finally:
        loop.remove_reader(in_fd)
        os.close(out)
    await on_eof()
