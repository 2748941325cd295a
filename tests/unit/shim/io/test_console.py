"""Terminal IO without runc: the test hands a pty master over the console socket
exactly the way `runc init` does (one message, data b"/dev/ptmx", SCM_RIGHTS)."""

from __future__ import annotations

import array
import asyncio
import errno
import os
import socket
import stat
import tty
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import uvloop

from shim.io import console
from shim.io.console import get_winsize
from shim.io.stdio import ProcessIO, StdioError, StdioSpec
from tests.unit.shim.io.test_stdio import (
    Runner,
    areadable,
    fd_count,
    mkfifo,
    open_io,
    read_fifo,
    write_all,
)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Iterator[Runner]:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        yield lambda coro: runner.run(coro)  # type: ignore[arg-type]


def send_fds(path: str, fds: Sequence[int], data: bytes = b"/dev/ptmx") -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([data], anc if fds else [])


class Pty:
    """A pty pair; the master is sent away as runc would, the slave is 'the container'."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # byte-exact both ways, no echo

    def send(self, pio: ProcessIO) -> None:
        assert pio.console_socket is not None
        send_fds(pio.console_socket, [self.master])
        os.close(self.master)  # runc keeps no copy
        self.master = -1

    def close(self) -> None:
        for fd in (self.master, self.slave):
            if fd >= 0:
                os.close(fd)
        self.master = self.slave = -1


@pytest.fixture
def pty_pair() -> Iterator[Pty]:
    pair = Pty()
    try:
        yield pair
    finally:
        pair.close()


async def read_exactly(fd: int, n: int, timeout: float = 5) -> bytes:
    got = b""
    while len(got) < n and await areadable(fd, timeout):
        got += os.read(fd, n - len(got))
    return got


def test_terminal_roundtrip_and_resize(run: Runner, tmp_path: Path, pty_pair: Pty) -> None:
    async def body() -> None:
        stdin, out = mkfifo(tmp_path, "in"), mkfifo(tmp_path, "out")
        reader = asyncio.ensure_future(asyncio.to_thread(read_fifo, out))
        pio = await open_io(StdioSpec(stdin, out, "", True))
        client_in = -1
        try:
            sock = pio.console_socket
            assert sock is not None and os.path.basename(sock) == "pty.sock"
            assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700
            assert pio.runtime_stdio() == (None, None, None)
            pio.resize(101, 33)  # before the master exists: remembered
            pty_pair.send(pio)
            await pio.started()
            assert not os.path.exists(os.path.dirname(sock))
            assert get_winsize(pty_pair.slave) == (101, 33)
            pio.resize(80, 24)
            assert get_winsize(pty_pair.slave) == (80, 24)
            pio.resize(65536 + 7, 2 * 65536 + 9)  # uint32 from the API, 16-bit in the kernel
            assert get_winsize(pty_pair.slave) == (7, 9)

            client_in = os.open(stdin, os.O_WRONLY)
            os.write(client_in, b"typed\x03")
            assert await read_exactly(pty_pair.slave, 6) == b"typed\x03"
            os.write(pty_pair.slave, b"printed\n")
            os.close(pty_pair.slave)  # the process exits: the master reads EIO
            pty_pair.slave = -1
            await asyncio.wait_for(pio.drain(5), 6)
            assert await asyncio.wait_for(reader, 5) == b"printed\n"
        finally:
            if client_in >= 0:
                os.close(client_in)
            await pio.close()

    run(body())


def test_stdin_eof_hangs_up_the_terminal(run: Runner, tmp_path: Path, pty_pair: Pty) -> None:
    async def body() -> None:
        stdin, out = mkfifo(tmp_path, "in"), mkfifo(tmp_path, "out")
        reader = asyncio.ensure_future(asyncio.to_thread(read_fifo, out))
        pio = await open_io(StdioSpec(stdin, out, "", True))
        try:
            pty_pair.send(pio)
            await pio.started()
            client_in = os.open(stdin, os.O_WRONLY)
            os.write(client_in, b"last")
            os.close(client_in)
            assert await read_exactly(pty_pair.slave, 4) == b"last"
            assert not await areadable(pty_pair.slave, 0.2)  # still connected
            pio.close_stdin()  # CloseIO: stdin ends, the master is closed
            assert await areadable(pty_pair.slave, 5)
            try:
                assert os.read(pty_pair.slave, 10) == b""
            except OSError as exc:
                assert exc.errno == errno.EIO
            await asyncio.wait_for(pio.drain(5), 6)
            assert await asyncio.wait_for(reader, 5) == b""
            pio.resize(10, 10)  # no master any more: nothing to do
        finally:
            await pio.close()

    run(body())


def test_terminal_output_to_a_file_and_no_stdin(run: Runner, tmp_path: Path, pty_pair: Pty) -> None:
    async def body() -> None:
        log = tmp_path / "tty.log"
        pio = await open_io(StdioSpec("", f"file://{log}", "", True))
        try:
            pty_pair.send(pio)
            await pio.started()
            # More than a terminal buffers: only a running copy lets this finish.
            await asyncio.wait_for(asyncio.to_thread(write_all, pty_pair.slave, b"x" * 100_000), 5)
            os.close(pty_pair.slave)
            pty_pair.slave = -1
            await asyncio.wait_for(pio.drain(5), 6)
            assert log.read_bytes() == b"x" * 100_000
        finally:
            await pio.close()

    run(body())


@pytest.mark.parametrize("count", [0, 2])
def test_console_needs_exactly_one_fd(run: Runner, tmp_path: Path, count: int) -> None:
    async def body() -> None:
        before = fd_count()
        extra = [os.open(os.devnull, os.O_RDONLY) for _ in range(count)]
        pio = await open_io(StdioSpec("", "", "", True))
        try:
            assert pio.console_socket is not None
            send_fds(pio.console_socket, extra)
            with pytest.raises(StdioError, match="exactly one fd"):
                await pio.started()
        finally:
            for fd in extra:
                os.close(fd)
            await pio.close()
        assert fd_count() == before

    run(body())


def test_console_fd_must_be_a_terminal(run: Runner, tmp_path: Path) -> None:
    async def body() -> None:
        before = fd_count()
        r, w = os.pipe()
        pio = await open_io(StdioSpec("", "", "", True))
        try:
            assert pio.console_socket is not None
            send_fds(pio.console_socket, [r])
            with pytest.raises(StdioError, match="not a terminal"):
                await pio.started()
        finally:
            os.close(r)
            os.close(w)
            await pio.close()
        assert fd_count() == before

    run(body())


def test_console_wait_is_bounded(run: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console, "RECEIVE_TIMEOUT", 0.2)

    async def body() -> None:
        before = fd_count()
        pio = await open_io(StdioSpec("", "", "", True))
        directory = os.path.dirname(pio.console_socket or "")
        try:
            with pytest.raises(StdioError, match="timed out"):
                await pio.started()
            assert not os.path.exists(directory)
        finally:
            await pio.close()
        assert fd_count() == before

    run(body())


def test_terminal_cycles_leak_nothing(run: Runner, tmp_path: Path) -> None:
    async def body() -> None:
        stdin, out = mkfifo(tmp_path, "in"), mkfifo(tmp_path, "out")
        client_out = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
        try:
            before = fd_count()
            dirs_before = set(os.listdir("/tmp"))
            for _ in range(50):
                pair = Pty()
                try:
                    pio = await open_io(StdioSpec(stdin, out, "", True))
                    pair.send(pio)
                    await pio.started()
                    pio.resize(40, 10)
                    await pio.close()
                finally:
                    pair.close()
            assert fd_count() == before
            assert {d for d in os.listdir("/tmp") if d.startswith("pty")} <= dirs_before
        finally:
            os.close(client_out)

    run(body())
