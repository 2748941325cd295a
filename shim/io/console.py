"""Console socket for runc's `--console-socket`, and pty window sizes (io.md §2)."""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import termios

from shim.io.copy import wait_readable

# runc has connected and sent the master before `runc create`/`exec` returns;
# the bound only guards against a runc that died half way (io.md §2.1).
RECEIVE_TIMEOUT = 30.0

# One message: the master's name (b"/dev/ptmx") in at most this many bytes.
_DATA_SIZE = 4096


class ConsoleError(Exception):
    pass


def set_winsize(fd: int, width: int, height: int) -> None:
    """TIOCSWINSZ with the kernel's 16-bit fields (larger values wrap like Go's)."""
    ws = struct.pack("HHHH", height & 0xFFFF, width & 0xFFFF, 0, 0)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, ws)


def get_winsize(fd: int) -> tuple[int, int]:
    """(width, height) of the terminal on `fd`."""
    raw = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
    rows, cols, _, _ = struct.unpack("HHHH", raw)
    return cols, rows


def _runtime_dir() -> str:
    for var in ("XDG_RUNTIME_DIR", "TMPDIR"):
        value = os.environ.get(var)
        if value:
            return value
    return "/tmp"


class ConsoleSocket:
    """A listening unix socket in a private 0700 directory.

    runc connects to it from inside `runc init` and sends the pty master with
    SCM_RIGHTS. `receive()` takes that fd and removes the socket and directory.
    """

    def __init__(self, directory: str, sock: socket.socket) -> None:
        self._dir = directory
        self._sock: socket.socket | None = sock
        self.path = os.path.join(directory, "pty.sock")

    @classmethod
    def create(cls) -> ConsoleSocket:
        base = _runtime_dir()
        directory = ""
        # mkdir is atomic, so a random name that already exists is simply retried.
        for _ in range(100):
            candidate = os.path.join(base, "pty" + os.urandom(8).hex())
            try:
                os.mkdir(candidate, 0o700)
            except FileExistsError:
                continue
            directory = candidate
            break
        else:
            raise ConsoleError(f"cannot create a console socket directory in {base}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.bind(os.path.join(directory, "pty.sock"))
            sock.listen(1)
        except BaseException:
            sock.close()
            _remove_dir(directory)
            raise
        return cls(directory, sock)

    async def receive(self, timeout: float | None = None) -> int:
        """Accept runc's connection and return the pty master (blocking mode as sent)."""
        if self._sock is None:
            raise ConsoleError("console socket already closed")
        try:
            async with asyncio.timeout(RECEIVE_TIMEOUT if timeout is None else timeout):
                conn = await self._accept(self._sock)
                try:
                    return await self._receive_fd(conn)
                finally:
                    conn.close()
        except TimeoutError:
            raise ConsoleError("timed out waiting for the console from the runtime") from None
        finally:
            self.close()

    @staticmethod
    async def _accept(sock: socket.socket) -> socket.socket:
        while True:
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                await wait_readable(sock.fileno())
                continue
            conn.setblocking(False)
            return conn

    @staticmethod
    async def _receive_fd(conn: socket.socket) -> int:
        fd_size = array.array("i").itemsize
        while True:
            try:
                data, ancdata, flags, _ = conn.recvmsg(
                    _DATA_SIZE, socket.CMSG_SPACE(fd_size), socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                await wait_readable(conn.fileno())
                continue
            break
        fds: list[int] = []
        foreign = False
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % fd_size
                fds.extend(array.array("i", payload[:usable]))
            else:
                foreign = True
        truncated = bool(flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC))
        if len(fds) != 1 or foreign or truncated:
            for fd in fds:
                os.close(fd)
            raise ConsoleError(
                f"console socket: expected exactly one fd, got {len(fds)}"
                + (" (truncated)" if truncated else "")
                + ("" if data else " and no data")
            )
        master = fds[0]
        if not os.isatty(master):
            os.close(master)
            raise ConsoleError("console socket: received fd is not a terminal")
        return master

    def close(self) -> None:
        if self._sock is None:
            return
        self._sock.close()
        self._sock = None
        _remove_dir(self._dir)


def _remove_dir(directory: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, "pty.sock"))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(directory)
