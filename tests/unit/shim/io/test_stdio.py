"""ProcessIO without runc: real fifos, pipes, files and logger processes.

The "container" is played by the test writing to / reading from the fds that
runc would get (`runtime_stdio()`); the "client" (ctr, CRI) by threads that
open the fifos the way clients do. Every test runs on asyncio and on uvloop.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import select
import stat
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from shim.io import copy as shim_copy
from shim.io import stdio
from shim.io.stdio import ProcessIO, StdioError, StdioSpec, open_process_io
from shim.reaper import Reaper

Runner = Callable[[Awaitable[Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Iterator[Runner]:
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        yield lambda coro: runner.run(coro)  # type: ignore[arg-type]


class _NoReaper:
    def spawn(self, *args: Any, **kwargs: Any) -> int:
        raise AssertionError("no process may be spawned here")

    async def wait(self, pid: int) -> int:
        raise AssertionError("no process may be waited for here")


NO_REAPER = _NoReaper()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def mkfifo(tmp_path: Path, name: str) -> str:
    path = str(tmp_path / name)
    os.mkfifo(path)
    return path


async def open_io(spec: StdioSpec, **kwargs: Any) -> ProcessIO:
    kwargs.setdefault("reaper", NO_REAPER)
    return await open_process_io(spec, process_id="p1", namespace="ns", **kwargs)


def read_until_eof(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        data = os.read(fd, 65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def read_fifo(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_until_eof(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


async def areadable(fd: int, timeout: float) -> bool:
    """`readable` without stopping the loop (the copies under test run on it)."""
    return await asyncio.to_thread(readable, fd, timeout)


class Container:
    """Plays the container: its own copies of the fds runc would hand over."""

    def __init__(self, pio: ProcessIO) -> None:
        self.fds = {i: os.dup(fd) for i, fd in enumerate(pio.runtime_stdio()) if fd is not None}

    def has(self, *streams: int) -> bool:
        return sorted(self.fds) == sorted(streams)

    def write(self, stream: int, data: bytes) -> None:
        write_all(self.fds[stream], data)

    def end(self, stream: int) -> None:
        os.close(self.fds.pop(stream))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


# -- null, errors, leaks -----------------------------------------------------------


def test_null_io_gives_runc_nothing(run: Runner) -> None:
    async def body() -> None:
        before = fd_count()
        pio = await open_io(StdioSpec("", "", "", False))
        assert pio.runtime_stdio() == (None, None, None)
        assert pio.console_socket is None
        assert fd_count() == before
        await pio.started()
        pio.resize(80, 24)  # no terminal: nothing to do, no error
        pio.close_stdin()
        await pio.drain(0.1)
        await pio.close()
        await pio.close()

    run(body())


def test_unknown_scheme_is_rejected(run: Runner) -> None:
    async def body() -> None:
        with pytest.raises(stdio.UnknownSchemeError, match=r"^unknown STDIO scheme http$"):
            await open_io(StdioSpec("", "http://example/x", "", False))

    run(body())


def test_url_scheme_follows_go() -> None:
    assert stdio.url_scheme("/run/fifo/x-stdout") == ""
    assert stdio.url_scheme("binary:///bin/log?x=1") == "binary"
    assert stdio.url_scheme("FILE:///a") == "file"
    assert stdio.url_scheme("1ab:x") == ""
    assert stdio.url_scheme("relative/pa:th") == ""
    assert stdio.url_scheme("") == ""


def test_logger_argv_takes_first_value_and_blank_keys() -> None:
    argv = stdio.logger_argv("binary:///usr/bin/my%20logger?opt1=v1&flag&opt1=v2&x=")
    assert argv == ["/usr/bin/my logger", "opt1", "v1", "flag", "", "x", ""]


def test_missing_stdout_path_fails_cleanly(run: Runner, tmp_path: Path) -> None:
    async def body() -> None:
        stdin = mkfifo(tmp_path, "in")
        before = fd_count()
        with pytest.raises(StdioError, match="opening stdout"):
            await open_io(StdioSpec(stdin, str(tmp_path / "missing"), "", False))
        assert fd_count() == before

    run(body())


def test_stdin_that_is_not_a_fifo_is_refused(run: Runner, tmp_path: Path) -> None:
    async def body() -> None:
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
        before = fd_count()
        with pytest.raises(StdioError, match="not a fifo"):
            await open_io(StdioSpec(str(plain), "", "", False))
        assert fd_count() == before

    run(body())


def test_fifo_without_reader_times_out(
    run: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shim_copy, "FIFO_OPEN_TIMEOUT", 0.3)

    async def body() -> None:
        out = mkfifo(tmp_path, "out")
        before = fd_count()
        start = time.monotonic()
        with pytest.raises(StdioError, match="timed out waiting for a reader"):
            await open_io(StdioSpec("", out, "", False))
        assert 0.25 < time.monotonic() - start < 3
        assert fd_count() == before

    run(body())


def test_open_close_cycles_leak_no_fds(run: Runner, tmp_path: Path) -> None:
    async def body() -> None:
        stdin, out, err = (mkfifo(tmp_path, n) for n in ("in", "out", "err"))
        log = str(tmp_path / "log")
        # The client's own ends stay open across cycles, as a client's would.
        client_out = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
        client_err = os.open(err, os.O_RDONLY | os.O_NONBLOCK)
        try:
            specs = [
                StdioSpec(stdin, out, err, False),
                StdioSpec("", f"file://{log}", "", False),
                StdioSpec("", "", "", False),
                StdioSpec(stdin, out, "", True),
            ]
            before = fd_count()
            for i in range(100):
                spec = specs[i % len(specs)]
                pio = await open_io(spec)
                if i % 8 < 4 and not spec.terminal:  # no runc sends a master here
                    await pio.started()
                await pio.close()
            assert fd_count() == before
        finally:
            os.close(client_out)
            os.close(client_err)

    run(body())


# -- fifo output -------------------------------------------------------------------


def test_output_reaches_late_reader(run: Runner, tmp_path: Path) -> None:
    async def body() -> None:
        out = mkfifo(tmp_path, "out")
        opening = asyncio.ensure_future(open_io(StdioSpec("", out, "", False)))
        await asyncio.sleep(0.3)
        assert not opening.done()  # waits for the client without blocking the loop
        reader = asyncio.ensure_future(asyncio.to_thread(read_fifo, out))
        pio = await asyncio.wait_for(opening, 5)
        c = Container(pio)
        try:
            assert c.has(1)
            await pio.started()
            c.write(1, b"hello late reader\n")
            c.end(1)
            await asyncio.wait_for(pio.drain(5), 6)
            assert await asyncio.wait_for(reader, 5) == b"hello late reader\n"
        finally:
            c.close()
            await pio.close()

    run(body())


def test_what_the_runtime_wrote_before_a_failed_create_is_not_copied(
    run: Runner, tmp_path: Path
) -> None:
    # runc prints its error on the stderr it was given too; the caller reports the
    # error, so copying it would show the user the same message twice.
    async def body() -> None:
        out, err = mkfifo(tmp_path, "out"), mkfifo(tmp_path, "err")
        readers = [asyncio.ensure_future(asyncio.to_thread(read_fifo, p)) for p in (out, err)]
        pio = await open_io(StdioSpec("", out, err, False))
        c = Container(pio)
        try:
            c.write(2, b"runc create failed: no such file\n")
            await asyncio.sleep(0.2)  # time a running copy would take to pass it on
        finally:
            c.close()
            await pio.close()
        assert await asyncio.wait_for(asyncio.gather(*readers), 5) == [b"", b""]

    run(body())


def test_what_the_runtime_wrote_before_start_is_copied_once_started(
    run: Runner, tmp_path: Path
) -> None:
    async def body() -> None:
        err = mkfifo(tmp_path, "err")
        reader = asyncio.ensure_future(asyncio.to_thread(read_fifo, err))
        pio = await open_io(StdioSpec("", "", err, False))
        c = Container(pio)
        try:
            c.write(2, b"a warning from a create that worked\n")
            await pio.started()
            c.write(2, b"then the process\n")
            c.end(2)
            await asyncio.wait_for(pio.drain(5), 6)
            assert await asyncio.wait_for(reader, 5) == (
                b"a warning from a create that worked\nthen the process\n"
            )
        finally:
            c.close()
            await pio.close()

    run(body())


def test_client_goes_away_and_comes_back(run: Runner, tmp_path: Path) -> None:
    async def body() -> None:
        out = mkfifo(tmp_path, "out")
        first = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
        pio = await open_io(StdioSpec("", out, "", False))
        c = Container(pio)
        try:
            assert c.has(1)
            await pio.started()
            c.write(1, b"one\n")
            await asyncio.sleep(0.1)
            assert os.read(first, 100) == b"one\n"
            os.close(first)  # containerd restarts
            first = -1
            # More than a fifo holds: the copy must wait, neither fail nor drop.
            payload = os.urandom(300 * 1024)
            writer = asyncio.ensure_future(asyncio.to_thread(c.write, 1, payload))
            await asyncio.sleep(0.3)
            assert not writer.done()
            again = asyncio.ensure_future(asyncio.to_thread(read_fifo, out))
            await asyncio.wait_for(writer, 5)
            c.end(1)
            assert await asyncio.wait_for(again, 5) == payload
        finally:
            c.close()
            if first >= 0:
                os.close(first)
            await pio.close()

    run(body())


def test_fifty_megabytes_through_a_slow_reader(run: Runner, tmp_path: Path) -> None:
    total = 50 * 1024 * 1024
    block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB, not all alike
    expect = hashlib.sha256()
    for i in range(total // len(block)):
        expect.update(i.to_bytes(4, "big") + block[4:])

    def produce(fd: int) -> None:
        try:
            for i in range(total // len(block)):
                write_all(fd, i.to_bytes(4, "big") + block[4:])
        finally:
            os.close(fd)

    def consume(path: str) -> tuple[str, int]:
        digest = hashlib.sha256()
        n = 0
        fd = os.open(path, os.O_RDONLY)
        try:
            while True:
                data = os.read(fd, 8192)
                if not data:
                    return digest.hexdigest(), n
                digest.update(data)
                n += len(data)
                if n < 2 * 1024 * 1024:
                    time.sleep(0.0005)  # slow at first so the shim must hold back
        finally:
            os.close(fd)

    async def body() -> None:
        out = mkfifo(tmp_path, "out")
        reader = asyncio.ensure_future(asyncio.to_thread(consume, out))
        pio = await open_io(StdioSpec("", out, "", False))
        try:
            _, container_out, _ = pio.runtime_stdio()
            assert container_out is not None
            # The producer owns a dup; started() closes the shim's copy as with runc.
            writer = asyncio.ensure_future(asyncio.to_thread(produce, os.dup(container_out)))
            await pio.started()
            await asyncio.wait_for(writer, 60)
            await asyncio.wait_for(pio.drain(60), 61)
            assert await asyncio.wait_for(reader, 10) == (expect.hexdigest(), total)
        finally:
            await pio.close()

    run(body())


def test_output_written_right_before_exit_is_drained(run: Runner, tmp_path: Path) -> None:
    async def body() -> None:
        out = mkfifo(tmp_path, "out")
        err = mkfifo(tmp_path, "err")
        readers = [asyncio.ensure_future(asyncio.to_thread(read_fifo, p)) for p in (out, err)]
        pio = await open_io(StdioSpec("", out, err, False))
        c = Container(pio)
        try:
            assert c.has(1, 2)
            await pio.started()
            c.write(1, b"x" * 60000)
            c.write(2, b"bye\n")
            c.end(1)
            c.end(2)
            await asyncio.wait_for(pio.drain(5), 6)
            # After drain the clients have read everything and our ends are closed: EOF.
            got = await asyncio.wait_for(asyncio.gather(*readers), 5)
            assert got == [b"x" * 60000, b"bye\n"]
        finally:
            c.close()
            await pio.close()

    run(body())


async def _until_unread(fd: int, n: int) -> None:
    deadline = time.monotonic() + 5
    while stdio.unread_bytes(fd) != n:
        assert time.monotonic() < deadline, f"{stdio.unread_bytes(fd)} bytes in the fifo, not {n}"
        await asyncio.sleep(0.01)


def test_drain_waits_until_the_client_has_read_the_fifo(run: Runner, tmp_path: Path) -> None:
    # The exit is reported once drain returns, and a client may stop reading then:
    # containerd 2.x's client closes its fifos at task Delete, which ctr run calls
    # as soon as Wait answers. Bytes the copy wrote but the client had not yet read
    # were lost that way (ctr run under containerd 2.3 on a slow guest).
    async def body() -> None:
        out = mkfifo(tmp_path, "out")
        client = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
        pio = await open_io(StdioSpec("", out, "", False))
        c = Container(pio)
        data = b"x" * 30000 + b"END"
        try:
            await pio.started()
            c.write(1, data)
            c.end(1)
            draining = asyncio.ensure_future(pio.drain(10))
            await _until_unread(client, len(data))  # all copied, none read yet
            await asyncio.sleep(0.2)
            assert not draining.done()
            got = read_until_eof(client)  # our write end is closed: the data, then EOF
            assert got == data
            await asyncio.wait_for(draining, 5)
        finally:
            c.close()
            os.close(client)
            await pio.close()

    run(body())


def test_drain_gives_up_on_a_client_that_does_not_read(run: Runner, tmp_path: Path) -> None:
    async def body() -> None:
        out = mkfifo(tmp_path, "out")
        client = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
        before = fd_count()
        pio = await open_io(StdioSpec("", out, "", False))
        c = Container(pio)
        try:
            await pio.started()
            c.write(1, b"never read")
            c.end(1)
            await _until_unread(client, len(b"never read"))
            start = time.monotonic()
            await pio.drain(0.3)
            assert 0.25 < time.monotonic() - start < 2
            await pio.drain(0.1)  # the delete's drain gives up the same way
        finally:
            c.close()
            await pio.close()
        assert fd_count() == before
        assert read_until_eof(client) == b"never read"
        os.close(client)

    run(body())


def test_drain_gives_up_at_timeout(run: Runner, tmp_path: Path) -> None:
    async def body() -> None:
        out = mkfifo(tmp_path, "out")
        client = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
        pio = await open_io(StdioSpec("", out, "", False))
        held = Container(pio)  # a daemonized child still holding stdout
        try:
            await pio.started()
            start = time.monotonic()
            await pio.drain(0.3)
            assert 0.25 < time.monotonic() - start < 2
        finally:
            held.close()
            os.close(client)
            await pio.close()

    run(body())


# -- files -------------------------------------------------------------------------


def _fds_pointing_at(path: Path) -> int:
    target = str(path)
    n = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == target:
                n += 1
        except FileNotFoundError:
            pass
    return n


def test_same_file_for_stdout_and_stderr_shares_one_fd(run: Runner, tmp_path: Path) -> None:
    async def body() -> None:
        log = tmp_path / "both.log"
        log.write_bytes(b"old\n")
        pio = await open_io(StdioSpec("", str(log), str(log), False))
        c = Container(pio)
        try:
            assert c.has(1, 2)
            assert _fds_pointing_at(log) == 1
            await pio.started()
            c.write(1, b"out\n")
            c.end(1)
            await asyncio.sleep(0.1)
            c.write(2, b"err\n")
            c.end(2)
            await asyncio.wait_for(pio.drain(5), 6)
            assert log.read_bytes() == b"old\nout\nerr\n"
            assert _fds_pointing_at(log) == 0  # closed once both copies ended
        finally:
            c.close()
            await pio.close()

    run(body())


def test_file_uri_appends_both_streams(run: Runner, tmp_path: Path) -> None:
    async def body() -> None:
        log = tmp_path / "a" / "b" / "c.log"
        pio = await open_io(StdioSpec("", f"file://{log}", "", False))
        c = Container(pio)
        try:
            assert stat.S_IMODE(log.stat().st_mode) == 0o644
            assert stat.S_IMODE(log.parent.stat().st_mode) == 0o755
            assert c.has(1, 2)
            await pio.started()
            c.write(1, b"to stdout\n")
            c.end(1)
            await asyncio.sleep(0.1)
            c.write(2, b"to stderr\n")
            c.end(2)
            await asyncio.wait_for(pio.drain(5), 6)
        finally:
            c.close()
            await pio.close()
        pio = await open_io(StdioSpec("", f"file://{log}", "", False))
        c = Container(pio)
        try:
            await pio.started()
            c.write(1, b"appended\n")
            c.end(1)
            c.end(2)
            await asyncio.wait_for(pio.drain(5), 6)
        finally:
            c.close()
            await pio.close()
        assert log.read_bytes() == b"to stdout\nto stderr\nappended\n"

    run(body())


# -- stdin ---------------------------------------------------------------------------


def test_stdin_eof_only_after_close_io(run: Runner, tmp_path: Path) -> None:
    async def body() -> None:
        stdin = mkfifo(tmp_path, "in")
        pio = await open_io(StdioSpec(stdin, "", "", False))
        c = Container(pio)
        container_in = c.fds[0]
        try:
            assert c.has(0)
            await pio.started()
            client = os.open(stdin, os.O_WRONLY)
            os.write(client, b"first ")
            os.close(client)  # a client may reopen: that is not the end of stdin
            client = os.open(stdin, os.O_WRONLY)
            os.write(client, b"second")
            os.close(client)
            got = b""
            while len(got) < 12 and await areadable(container_in, 2):
                got += os.read(container_in, 100)
            assert got == b"first second"
            assert not await areadable(container_in, 0.3)  # no EOF before CloseIO
            pio.close_stdin()
            pio.close_stdin()
            assert await areadable(container_in, 2)
            assert os.read(container_in, 100) == b""
        finally:
            c.close()
            await pio.close()

    run(body())


def test_stdin_to_an_exited_process_does_not_wedge(run: Runner, tmp_path: Path) -> None:
    async def body() -> None:
        stdin = mkfifo(tmp_path, "in")
        pio = await open_io(StdioSpec(stdin, "", "", False))
        try:
            assert pio.runtime_stdio()[0] is not None
            await pio.started()  # nobody else holds the read end: writes fail with EPIPE
            client = os.open(stdin, os.O_WRONLY)
            try:
                # Far more than the pipes hold: the copy must keep draining the fifo.
                await asyncio.wait_for(
                    asyncio.to_thread(write_all, client, b"z" * (1024 * 1024)), 5
                )
            finally:
                os.close(client)
        finally:
            await pio.close()

    run(body())


# -- binary:// -----------------------------------------------------------------------

LOGGER = """\
#!{python}
import fcntl, os, signal, stat, sys, time
report = {report!r}
def note(line):
    with open(report, "a") as f:
        f.write(line + "\\n")
# os.environ may have LC_CTYPE added by Python itself (PEP 538): read what exec got.
with open("/proc/self/environ", "rb") as f:
    keys = sorted(e.split(b"=")[0].decode() for e in f.read().split(b"\\0") if e)
note("env " + ",".join(keys))
env = os.environ
note("id " + env.get("CONTAINER_ID", "?") + " ns " + env.get("CONTAINER_NAMESPACE", "?"))
note("argv " + " ".join(sys.argv[1:]))
for fd in (3, 4, 5):
    fifo = stat.S_ISFIFO(os.fstat(fd).st_mode)
    acc = os.O_ACCMODE & fcntl.fcntl(fd, fcntl.F_GETFL)
    note(f"fd {{fd}} fifo={{fifo}} acc={{acc}}")
note("fd 6 open" if os.path.exists("/proc/self/fd/6") else "fd 6 closed")
stdin_target = os.readlink("/proc/self/fd/0")
note("stdin " + stdin_target)
mode = {mode!r}
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    def term(*_):
        note("TERM")
        os._exit(0)
    signal.signal(signal.SIGTERM, term)
time.sleep(0.3)
note("ready")
os.close(5)
out = open({out!r}, "ab", buffering=0)
for fd in (3, 4):
    while True:
        data = os.read(fd, 65536)
        if not data:
            break
        out.write(data)
note("eof")
while True:
    signal.pause()
"""


def _write_logger(tmp_path: Path, mode: str = "polite") -> tuple[Path, Path, Path]:
    script = tmp_path / "logger.py"
    report = tmp_path / "report"
    out = tmp_path / "logged"
    script.write_text(
        LOGGER.format(python=sys.executable, report=str(report), out=str(out), mode=mode)
    )
    script.chmod(0o755)
    return script, report, out


def _report(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def _wait_for_line(path: Path, line: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while line not in _report(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{line!r} never reported; report: {_report(path)}")
        await asyncio.sleep(0.02)


def test_binary_logger_protocol(run: Runner, tmp_path: Path) -> None:
    script, report, out = _write_logger(tmp_path)

    async def body() -> None:
        reaper = Reaper()
        reaper.install(asyncio.get_running_loop())
        pio: ProcessIO | None = None
        try:
            # An open fd at 6 in the shim must not reach the logger.
            extra = os.open(os.devnull, os.O_RDONLY)
            try:
                start = time.monotonic()
                pio = await open_process_io(
                    StdioSpec("", f"binary://{script}?tag=web&debug", "", False),
                    process_id="exec-7",
                    namespace="k8s.io",
                    reaper=reaper,
                )
            finally:
                os.close(extra)
            # Create must not proceed before the logger said it is ready.
            assert time.monotonic() - start >= 0.25
            lines = _report(report)
            assert "ready" in lines
            assert "env CONTAINER_ID,CONTAINER_NAMESPACE" in lines
            assert "id exec-7 ns k8s.io" in lines
            assert "argv tag web debug " in lines
            assert f"fd 3 fifo=True acc={os.O_RDONLY}" in lines
            assert f"fd 4 fifo=True acc={os.O_RDONLY}" in lines
            assert f"fd 5 fifo=True acc={os.O_WRONLY}" in lines
            assert "fd 6 closed" in lines
            assert "stdin /dev/null" in lines
            c = Container(pio)
            try:
                assert c.has(1, 2)
                await pio.started()
                c.write(1, b"to stdout\n")
                c.end(1)
                c.write(2, b"to stderr\n")
            finally:
                c.close()
            await _wait_for_line(report, "eof")  # our copies of the pipes are closed
            assert out.read_bytes() == b"to stdout\nto stderr\n"
            logger = pio._logger
            assert logger is not None
            await asyncio.wait_for(pio.close(), 5)
            assert _report(report)[-1] == "TERM"
            assert logger.exited.done() and logger.exited.result() == 0
        finally:
            if pio is not None:
                await pio.close()
            reaper.uninstall()

    run(body())


def test_binary_logger_ignoring_sigterm_is_killed(
    run: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stdio, "LOGGER_STOP_TIMEOUT", 0.5)
    script, _, _ = _write_logger(tmp_path, mode="stubborn")

    async def body() -> None:
        reaper = Reaper()
        reaper.install(asyncio.get_running_loop())
        try:
            pio = await open_io(StdioSpec("", f"binary://{script}", "", False), reaper=reaper)
            logger = pio._logger
            assert logger is not None
            await pio.started()
            start = time.monotonic()
            await asyncio.wait_for(pio.close(), 5)
            assert 0.4 < time.monotonic() - start < 4
            assert logger.exited.result() == 128 + 9
        finally:
            reaper.uninstall()

    run(body())


def test_binary_logger_that_cannot_start(run: Runner, tmp_path: Path) -> None:
    async def body() -> None:
        reaper = Reaper()
        reaper.install(asyncio.get_running_loop())
        try:
            before = fd_count()
            with pytest.raises(StdioError, match="failed to start logging binary"):
                await open_io(StdioSpec("", f"binary://{tmp_path}/nope", "", False), reaper=reaper)
            assert fd_count() == before
        finally:
            reaper.uninstall()

    run(body())


def test_copier_abandons_broken_destination_but_drains_source(run: Runner) -> None:
    async def body() -> None:
        src_r, src_w = os.pipe()
        dst_r, dst_w = os.pipe()
        os.set_blocking(src_r, False)
        os.set_blocking(dst_w, False)
        os.close(dst_r)  # EPIPE on the first write
        copier = shim_copy.Copier(src_r, dst_w, name="t")
        copier.start()
        try:
            await asyncio.to_thread(write_all, src_w, b"q" * (512 * 1024))
            os.close(src_w)
            src_w = -1
            await asyncio.wait_for(copier.done, 5)
            assert copier.bytes_copied == 0
        finally:
            copier.cancel()
            for fd in (src_r, src_w, dst_w):
                if fd >= 0:
                    os.close(fd)

    run(body())


def test_errno_of_enxio_is_what_nonblocking_fifo_open_reports(tmp_path: Path) -> None:
    # The retry loop in open_fifo_writer relies on this kernel behaviour.
    path = mkfifo(tmp_path, "f")
    with pytest.raises(OSError) as info:
        os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    assert info.value.errno == errno.ENXIO


def test_copies_run_without_threads(run: Runner, tmp_path: Path) -> None:
    async def body() -> None:
        out = mkfifo(tmp_path, "out")
        client = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
        threads = threading.active_count()
        pio = await open_io(StdioSpec(mkfifo(tmp_path, "in"), out, "", False))
        try:
            await pio.started()
            assert threading.active_count() == threads
        finally:
            os.close(client)
            await pio.close()

    run(body())
