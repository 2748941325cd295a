"""Moving bytes for the CLI: tail a container's log file, feed its stdin fifo.

Output never passes through pyshimd: the shim appends to the log file and we read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
from collections.abc import Awaitable, Callable
from pathlib import Path

# Only while following: how often a quiet log is looked at again.
POLL_INTERVAL = 0.05
# After the process exited, the shim may still be copying its last output.
SETTLE_QUIET = 0.2
SETTLE_MAX = 2.0
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


class LogTail:
    def __init__(self, path: Path, out_fd: int, *, from_end: bool = False) -> None:
        self._f = path.open("rb")
        if from_end:
            self._f.seek(0, os.SEEK_END)
        self._out = out_fd

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
            _write_all(self._out, data)
            total += len(data)

    async def follow(self, done: asyncio.Event) -> None:
        """Until ``done``; then until the file has been quiet for a moment."""
        while not done.is_set():
            if not self.pump():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), POLL_INTERVAL)
        await self.settle()

    async def settle(self) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + SETTLE_MAX
        quiet_since = loop.time()
        while loop.time() < end:
            if self.pump():
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= SETTLE_QUIET:
                return
            await asyncio.sleep(POLL_INTERVAL)

    def close(self) -> None:
        self._f.close()


async def open_fifo_writer(path: str, timeout: float = 10.0) -> int:
    """O_NONBLOCK open fails with ENXIO until the shim has its reader: retry, bounded."""
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
