"""The bundle's `log` fifo: the manager holds it open for reading and relays shim log lines."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("pyshimd.shim")

# A line longer than this is relayed in pieces rather than buffered without bound.
MAX_LINE = 16 << 10


def make_log_fifo(bundle: Path) -> Path:
    path = bundle / "log"
    try:
        if stat.S_ISFIFO(path.lstat().st_mode):
            return path
        path.unlink()
    except FileNotFoundError:
        pass
    os.mkfifo(path, 0o700)
    return path


class LogRelay:
    """Reads a shim's log fifo on the event loop. Opened O_RDWR so the open never blocks
    and the fifo never reports EOF while the shim restarts its writer."""

    def __init__(self, container_id: str, path: Path) -> None:
        self._id = container_id
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._buf = b""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("reading shim log of %s: %s", self._id, exc)
            self.close()
            return
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        if len(self._buf) > MAX_LINE:
            lines.append(self._buf)
            self._buf = b""
        for line in lines:
            if line.strip():
                log.info("[%s] %s", self._id, line.decode(errors="replace"))

    def close(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
