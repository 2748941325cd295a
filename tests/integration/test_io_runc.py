"""ProcessIO with the real runc: --console-socket terminals, pipes, stdin EOF.

The test process plays the shim (child subreaper, reaper on a uvloop loop) and the
client (it makes the fifos and opens its ends first, as ctr does).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import shutil
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from crashtest.images import oci_config, write_oci_bundle
from shim.io.stdio import ProcessIO, StdioSpec, open_process_io
from shim.reaper import Reaper
from shim.sys import syscalls
from shim.task.runtime import Runc, RuncOptions, RuntimeFailure
from tests.support.exits import ExitRecorder

pytestmark = pytest.mark.integration

NAMESPACE = "pyshim-io-test"
TIMEOUT = 20.0
_CGROUP_PARENT = f"pyshim-io-{os.getpid()}"


class Harness(ExitRecorder):
    def __init__(self, tmp: Path, reaper: Reaper) -> None:
        super().__init__()
        self.tmp = tmp
        self.reaper = reaper
        self.root = tmp / "runc-root"
        self.containers: list[tuple[Runc, str]] = []
        self.ios: list[ProcessIO] = []
        self.fds: list[int] = []

    def bundle(self, cid: str, args: list[str], *, terminal: bool = False) -> Runc:
        bundle = self.tmp / cid
        write_oci_bundle(bundle, args, terminal=terminal, cgroups_path=f"/{_CGROUP_PARENT}/{cid}")
        runc = Runc(self.reaper, RuncOptions(root=str(self.root)), NAMESPACE, str(bundle))
        self.containers.append((runc, cid))
        return runc

    def fifo(self, name: str) -> str:
        path = str(self.tmp / name)
        os.mkfifo(path)
        return path

    def client_reader(self, path: str) -> int:
        """The client's read end, opened before Create as ctr does."""
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.fds.append(fd)
        return fd

    async def open_io(self, spec: StdioSpec, process_id: str) -> ProcessIO:
        pio = await open_process_io(
            spec, process_id=process_id, namespace=NAMESPACE, reaper=self.reaper
        )
        self.ios.append(pio)
        return pio

    async def create(self, runc: Runc, cid: str, pio: ProcessIO) -> int:
        pid_file = os.path.join(runc.bundle, "init.pid")
        await asyncio.wait_for(
            runc.create(
                cid,
                pid_file=pid_file,
                console_socket=pio.console_socket,
                stdio=pio.runtime_stdio(),
            ),
            TIMEOUT,
        )
        await asyncio.wait_for(pio.started(), TIMEOUT)
        return int(Path(pid_file).read_text())

    async def exec(self, runc: Runc, cid: str, exec_id: str, pio: ProcessIO, args: list[str],
                   terminal: bool) -> int:  # fmt: skip
        process = oci_config(args, terminal=terminal)["process"]
        pid_file = os.path.join(runc.bundle, f"{exec_id}.pid")
        await asyncio.wait_for(
            runc.exec(
                cid,
                json.dumps(process).encode(),
                pid_file=pid_file,
                console_socket=pio.console_socket,
                stdio=pio.runtime_stdio(),
            ),
            TIMEOUT,
        )
        await asyncio.wait_for(pio.started(), TIMEOUT)
        return int(Path(pid_file).read_text())


def read_until_eof(fd: int, timeout: float = TIMEOUT) -> bytes:
    """Blocking read of a client fifo end until every writer is gone."""
    import select

    os.set_blocking(fd, True)
    chunks: list[bytes] = []
    while select.select([fd], [], [], timeout)[0]:
        data = os.read(fd, 65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
    raise AssertionError(f"no EOF within {timeout}s; got {b''.join(chunks)[-200:]!r}")


async def read_until(fd: int, needle: bytes, timeout: float = TIMEOUT) -> bytes:
    """Non-blocking reads on the loop until `needle` shows up."""
    os.set_blocking(fd, False)
    got = b""
    deadline = asyncio.get_running_loop().time() + timeout
    while needle not in got:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{needle!r} not seen; got {got!r}")
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            await asyncio.sleep(0.02)
            continue
        if not data:
            raise AssertionError(f"EOF before {needle!r}; got {got!r}")
        got += data
    return got


def run_with_runc(tmp_path: Path, body: Callable[[Harness], Awaitable[None]]) -> None:
    if shutil.which("runc") is None:
        pytest.fail("runc is not installed (apt-get install runc)")
    if os.geteuid() != 0:
        pytest.fail("these tests need root")

    async def main() -> None:
        was_subreaper = syscalls.get_child_subreaper()
        syscalls.set_child_subreaper(True)
        reaper = Reaper()
        reaper.install(asyncio.get_running_loop())
        h = Harness(tmp_path, reaper)
        unsubscribe = reaper.subscribe(h.on_exit)
        try:
            await body(h)
        finally:
            for runc, cid in h.containers:
                with contextlib.suppress(RuntimeFailure, TimeoutError):
                    await asyncio.wait_for(runc.delete(cid, force=True), TIMEOUT)
            for pio in h.ios:
                await pio.close()
            for fd in h.fds:
                os.close(fd)
            await asyncio.sleep(0.1)
            unsubscribe()
            reaper.uninstall()
            syscalls.set_child_subreaper(was_subreaper)
            for path in glob.glob(f"/sys/fs/cgroup/*/{_CGROUP_PARENT}"):
                with contextlib.suppress(OSError):
                    os.rmdir(path)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def test_terminal_resize_and_stty_size(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        cid = "tty1"
        runc = h.bundle(cid, ["sh", "-c", "read go; stty size; exit 7"], terminal=True)
        stdin, stdout = h.fifo("in"), h.fifo("out")
        out = h.client_reader(stdout)
        pio = await h.open_io(StdioSpec(stdin, stdout, "", True), cid)
        assert pio.runtime_stdio() == (None, None, None)
        assert pio.console_socket is not None
        pio.resize(101, 33)  # before the master arrives (containerd may do this)
        pid = await h.create(runc, cid, pio)
        await asyncio.wait_for(runc.start(cid), TIMEOUT)
        client_in = os.open(stdin, os.O_WRONLY)
        h.fds.append(client_in)
        os.write(client_in, b"go\r")
        got = await read_until(out, b"33 101")
        assert await h.exit_of(pid) == 7
        await asyncio.wait_for(pio.drain(5), 6)
        assert b"33 101\r\n" in got + read_until_eof(out)

    run_with_runc(tmp_path, body)


def test_terminal_exec_resize(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        cid = "tty2"
        runc = h.bundle(cid, ["sleep", "60"])
        init_io = await h.open_io(StdioSpec("", "", "", False), cid)
        init_pid = await h.create(runc, cid, init_io)
        await asyncio.wait_for(runc.start(cid), TIMEOUT)
        stdin, stdout = h.fifo("in"), h.fifo("out")
        out = h.client_reader(stdout)
        pio = await h.open_io(StdioSpec(stdin, stdout, "", True), "e1")
        pid = await h.exec(runc, cid, "e1", pio, ["sh", "-c", "read go; stty size"], True)
        pio.resize(120, 40)  # after the master arrived
        client_in = os.open(stdin, os.O_WRONLY)
        h.fds.append(client_in)
        os.write(client_in, b"go\r")
        assert b"40 120" in await read_until(out, b"40 120")
        assert await h.exit_of(pid) == 0
        await asyncio.wait_for(pio.drain(5), 6)
        read_until_eof(out)
        await runc.kill(cid, 9)
        assert await h.exit_of(init_pid) == 137

    run_with_runc(tmp_path, body)


def test_output_right_before_exit_is_complete(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        cid = "out1"
        script = "dd if=/dev/zero bs=65536 count=32 2>/dev/null; echo -n END; echo oops >&2; exit 3"
        runc = h.bundle(cid, ["sh", "-c", script])
        stdout, stderr = h.fifo("out"), h.fifo("err")
        out, err = h.client_reader(stdout), h.client_reader(stderr)
        pio = await h.open_io(StdioSpec("", stdout, stderr, False), cid)
        pid = await h.create(runc, cid, pio)
        results: dict[str, bytes] = {}
        readers = [
            threading.Thread(target=lambda: results.__setitem__("out", read_until_eof(out))),
            threading.Thread(target=lambda: results.__setitem__("err", read_until_eof(err))),
        ]
        for t in readers:
            t.start()
        await asyncio.wait_for(runc.start(cid), TIMEOUT)
        assert await h.exit_of(pid) == 3
        await asyncio.wait_for(pio.drain(5), 6)
        for t in readers:
            await asyncio.to_thread(t.join, TIMEOUT)
        assert results["out"] == b"\0" * (32 * 65536) + b"END"
        assert results["err"] == b"oops\n"

    run_with_runc(tmp_path, body)


def test_stdin_reaches_cat_and_close_io_ends_it(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        cid = "cat1"
        runc = h.bundle(cid, ["sh", "-c", "cat; echo done"])
        stdin, stdout = h.fifo("in"), h.fifo("out")
        out = h.client_reader(stdout)
        pio = await h.open_io(StdioSpec(stdin, stdout, "", False), cid)
        pid = await h.create(runc, cid, pio)
        await asyncio.wait_for(runc.start(cid), TIMEOUT)
        payload = os.urandom(200_000)
        result: dict[str, Any] = {}
        reader = threading.Thread(target=lambda: result.__setitem__("out", read_until_eof(out)))
        reader.start()

        def feed() -> None:
            fd = os.open(stdin, os.O_WRONLY)
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)

        await asyncio.wait_for(asyncio.to_thread(feed), TIMEOUT)
        await asyncio.sleep(0.2)
        assert pid not in h.exits  # the client closing is not EOF while we hold stdin
        pio.close_stdin()  # CloseIO
        assert await h.exit_of(pid) == 0
        await asyncio.wait_for(pio.drain(5), 6)
        await asyncio.to_thread(reader.join, TIMEOUT)
        assert result["out"] == payload + b"done\n"

    run_with_runc(tmp_path, body)
