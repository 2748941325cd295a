"""Byte pumps between file descriptors, driven by the event loop.

Every copy runs as callbacks on the loop (no thread per stream, no polling):
read the source when it is readable, write the destination, and when the
destination is full stop reading the source until the destination drains, so
a slow consumer pushes back on the container instead of growing our memory.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable

_log = logging.getLogger(__name__)

# A pipe holds 64 KiB by default; reading that much at once keeps the number of
# loop wake-ups per megabyte low without holding more than one pipe's worth.
CHUNK_SIZE = 64 * 1024

# How long a fifo open may wait for the client's end (io.md §1.2: 30 s bound).
FIFO_OPEN_TIMEOUT = 30.0


def set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


async def open_fifo_writer(path: str, timeout: float | None = None) -> int:
    """Open a fifo for writing without ever blocking the loop.

    A non-blocking O_WRONLY open fails with ENXIO while nobody has the read end
    open. The client normally opened it before calling us, so the first try
    succeeds; otherwise back off on a timer (only while waiting) up to `timeout`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (FIFO_OPEN_TIMEOUT if timeout is None else timeout)
    delay = 0.005
    while True:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"timed out waiting for a reader on fifo {path}")
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.5)


async def wait_readable(fd: int) -> None:
    """Resolve once `fd` is readable (or hung up)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


class Copier:
    """Pump bytes from `src` to `dst` until `src` reaches end of file.

    Both descriptors must be non-blocking, except that `dst` may be a regular
    file (those never return EAGAIN and cannot be registered with epoll).
    The copier never closes either descriptor; its owner does that from
    `on_done`, after the copier has dropped its loop registrations.

    `done` resolves when the source hit EOF (or `stop_reading`/`cancel` was
    called) and everything read so far has been handed to the destination.
    A destination that fails (EPIPE, ENOSPC...) is abandoned but the source is
    still drained, so the writer on the other side never wedges on a full pipe.
    """

    def __init__(
        self,
        src: int,
        dst: int,
        *,
        name: str,
        on_done: Callable[[Copier], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.src = src
        self.dst = dst
        self.name = name
        self._on_done = on_done
        self._pending = memoryview(b"")
        self._reading = False
        self._writing = False
        self._src_eof = False
        self._discard = False
        self.bytes_copied = 0
        self.done: asyncio.Future[None] = self._loop.create_future()

    def start(self) -> None:
        if not self.done.done() and not self._reading and not self._writing:
            self._want_read(True)

    def stop_reading(self) -> None:
        """Treat the source as ended now; still flush what was already read."""
        if self.done.done():
            return
        self._src_eof = True
        self._want_read(False)
        if not self._pending:
            self._finish()

    def cancel(self) -> None:
        """Stop at once, dropping anything not yet written."""
        if self.done.done():
            return
        self._pending = memoryview(b"")
        self._finish()

    def _want_read(self, on: bool) -> None:
        if on and not self._reading:
            self._loop.add_reader(self.src, self._on_readable)
        elif not on and self._reading:
            self._loop.remove_reader(self.src)
        self._reading = on

    def _want_write(self, on: bool) -> None:
        if on and not self._writing:
            self._loop.add_writer(self.dst, self._on_writable)
        elif not on and self._writing:
            self._loop.remove_writer(self.dst)
        self._writing = on

    def _on_readable(self) -> None:
        try:
            data = os.read(self.src, CHUNK_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            # EIO is how a pty master reports that the slave side is gone: the
            # normal end of a terminal's output. Anything else ends it too.
            if exc.errno != errno.EIO:
                _log.warning("copy %s: read failed: %s", self.name, exc)
            data = b""
        if not data:
            self._src_eof = True
            self._want_read(False)
            self._finish()
            return
        if self._discard:
            return
        self._pending = memoryview(data)
        self._flush()

    def _on_writable(self) -> None:
        self._flush()

    def _flush(self) -> None:
        while self._pending:
            try:
                n = os.write(self.dst, self._pending)
            except BlockingIOError:
                break
            except OSError as exc:
                self._abandon_dst(exc)
                return
            if n <= 0:
                self._abandon_dst(OSError(errno.EIO, "short write of 0 bytes"))
                return
            self.bytes_copied += n
            self._pending = self._pending[n:]
        if self._pending:
            # Back-pressure: leave the rest in the source until there is room.
            self._want_read(False)
            self._want_write(True)
            return
        self._want_write(False)
        if self._src_eof:
            self._finish()
        else:
            self._want_read(True)

    def _abandon_dst(self, exc: OSError) -> None:
        if exc.errno != errno.EPIPE:
            _log.warning("copy %s: write failed, discarding further data: %s", self.name, exc)
        self._discard = True
        self._pending = memoryview(b"")
        self._want_write(False)
        if self._src_eof:
            self._finish()
        else:
            self._want_read(True)

    def _finish(self) -> None:
        self._want_read(False)
        self._want_write(False)
        if self.done.done():
            return
        self.done.set_result(None)
        if self._on_done is not None:
            try:
                self._on_done(self)
            except Exception:
                _log.exception("copy %s: completion callback failed", self.name)
