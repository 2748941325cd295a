"""containerd restarts while a container prints: the container is neither blocked for good
nor killed, and ctr re-attached afterwards sees its later output.

How the output travels: ``ctr run -d`` creates the stdio fifos and exits; the shim
writes the container's output into the stdout fifo and also holds a read end of it
(io.md §1.2), so a client going away never turns into EPIPE/SIGPIPE for the
container. containerd itself never touches these fifos (only CRI's would), so
killing it leaves the output path alone.

What happens when nobody reads: the shim keeps the reference behaviour,
back-pressure. Output piles up in the container's pipe, the shim's one read chunk
and the 64 KiB fifo (about 192 KiB); after that the container's ``write`` waits
until a reader comes back, and nothing is dropped. The alternative, discarding
output the shim cannot deliver, would lose logs for good (CRI relies on reading the
same fifo again after a containerd restart). Such a container is blocked only while
nobody reads: it is still RUNNING, and the shim stays responsive. The tests below
check that a slow printer runs through the outage without stalling, and that a fast
one stalls, then resumes with nothing lost once ctr re-attaches.

A ctr limitation (the Go runc shim behaves the same): a ``ctr task attach`` that
dies because containerd went away removes the fifo directory on its way out, and no
later attach can open the fifos ("failed to open stdin fifo"). So the tests
re-attach to a container whose first client (``ctr run -d``) exited normally.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from google.protobuf.message import Message
from ptyprocess import PtyProcess

from protocol.proto.task.v2 import shim_pb2
from protocol.proto.types import task_pb2 as types_pb2
from protocol.ttrpc.client import Client
from shim.sys.procfs import gone
from tests.support.containerd import Containerd

pytestmark = pytest.mark.integration

M = TypeVar("M", bound=Message)
R = TypeVar("R", bound=Message)
T = TypeVar("T")
TASK = "containerd.task.v2.Task"

RUNTIME = "io.containerd.pyshim.v1"
TIMEOUT = 30.0
DOWNTIME = 2.0
# One line every 50 ms; the counter file shows progress without reading stdout.
LOOP = 'i=0; while :; do i=$((i+1)); echo "line $i{pad}"; echo $i > /tmp/count; sleep 0.05; done'
# 8 KiB lines fill what the pipe, the shim and the fifo can hold in about a second.
BIG_PAD = 8000


def _script(pad: int) -> str:
    if not pad:
        return LOOP.format(pad="")
    return f"pad=$(head -c {pad} /dev/zero | tr '\\0' x); " + LOOP.format(pad=" $pad")


def _ctr_argv(ctrd: Containerd, *args: str) -> list[str]:
    return ctrd.ctr_argv(*args)


def _wait(what: str, check: Callable[[], T], timeout: float = TIMEOUT) -> T:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return result


def _task(ctrd: Containerd, cid: str) -> tuple[int, str]:
    for line in ctrd.ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return int(fields[1]), fields[2]
    raise AssertionError(f"task {cid} not listed")


def _counter(pid: int) -> int:
    """The container's own count of lines it has written (a file in its rootfs)."""
    path = Path(f"/proc/{pid}/root/tmp/count")
    for _ in range(100):
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return 0
        if text:
            return int(text)
        # Caught between the shell truncating the file and writing the number.
        time.sleep(0.005)
    raise AssertionError(f"{path} stays empty")


def _shim_call(ctrd: Containerd, cid: str, method: str, req: M, resp_type: type[R]) -> R:
    """Ask the shim directly (containerd may be down), bounded: it must not be blocked."""
    path = (ctrd.bundle(cid) / "address").read_text().strip().removeprefix("unix://")

    async def call() -> R:
        async with await Client.connect(path, timeout=5) as client:
            return await client.call(TASK, method, req, resp_type, timeout=2)

    return asyncio.run(call())


def _shim_state(ctrd: Containerd, cid: str) -> shim_pb2.StateResponse:
    return _shim_call(ctrd, cid, "State", shim_pb2.StateRequest(id=cid), shim_pb2.StateResponse)


def _shim_pid(ctrd: Containerd, cid: str) -> int:
    # Asked rather than looked up by argv: a daemon forked from a template has none.
    req = shim_pb2.ConnectRequest(id=cid)
    pid = _shim_call(ctrd, cid, "Connect", req, shim_pb2.ConnectResponse).shim_pid
    assert not gone(pid)
    return pid


@dataclass
class Run:
    cid: str
    pid: int
    shim: int


def _start(ctrd: Containerd, cid: str, *, tty: bool, pad: int = 0) -> Run:
    # Fifos in the private containerd's temp dir, removed with it.
    args = ("run", "-d", "--fifo-dir", str(ctrd.tmp / "fifo"), "--runtime", RUNTIME,
            "docker.io/library/busybox:latest", cid, "sh", "-c", _script(pad))  # fmt: skip
    if tty:
        # ctr -t needs a terminal of its own; it detaches and exits like the plain run.
        proc = PtyProcess.spawn(_ctr_argv(ctrd, args[0], "-t", *args[1:]), env=ctrd.env())
        try:
            _wait("ctr run -t -d to exit", lambda: _drained_exit(proc))
            assert proc.exitstatus == 0, f"ctr run -t -d failed: status {proc.exitstatus}"
        finally:
            proc.close(force=True)
    else:
        ctrd.ctr(*args)
    pid, status = _task(ctrd, cid)
    assert status == "RUNNING"
    _wait("the container to print", lambda: _counter(pid) >= 5)
    shim = _shim_pid(ctrd, cid)
    return Run(cid, pid, shim)


def _drained_exit(proc: PtyProcess) -> bool:
    # Keep reading so ctr never blocks on its terminal while it finishes.
    if select.select([proc.fd], [], [], 0.05)[0]:
        with contextlib.suppress(OSError):
            os.read(proc.fd, 65536)
    return not proc.isalive()


class Attach:
    """``ctr task attach`` (under a terminal of ours for a tty task), killed by pid."""

    def __init__(self, ctrd: Containerd, cid: str, *, tty: bool) -> None:
        argv = _ctr_argv(ctrd, "task", "attach", cid)
        self.tty = tty
        self.seen = b""
        self.pty: PtyProcess | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        if tty:
            self.pty = PtyProcess.spawn(argv, env=ctrd.env())
            self.fd = self.pty.fd
            self.pid = self.pty.pid
        else:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=ctrd.env())  # fmt: skip
            assert self.proc.stdout is not None
            self.fd = self.proc.stdout.fileno()
            self.pid = self.proc.pid

    def read_until(self, done: Callable[[list[tuple[int, str]]], bool]) -> list[tuple[int, str]]:
        deadline = time.monotonic() + TIMEOUT
        while not done(lines := self.lines()):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"attach saw {self.seen[-300:]!r}; {self.stderr()}")
            if not select.select([self.fd], [], [], min(left, 0.5))[0]:
                continue
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                data = b""
            if not data:
                raise AssertionError(f"attach ended; saw {self.seen[-300:]!r}; {self.stderr()}")
            self.seen += data
        return lines

    def lines(self) -> list[tuple[int, str]]:
        """(number, pad) of every complete line; a torn first line is left out."""
        text = self.seen.replace(b"\r", b"").decode(errors="replace")
        out = []
        for line in text.split("\n")[:-1]:
            m = re.fullmatch(r"line (\d+)( x*)?", line)
            if m:
                out.append((int(m.group(1)), (m.group(2) or "").strip()))
            elif out:
                raise AssertionError(f"garbled line after line {out[-1][0]}: {line[:80]!r}")
        return out

    def stderr(self) -> str:
        if self.proc is not None and self.proc.poll() is not None and self.proc.stderr:
            return self.proc.stderr.read().decode(errors="replace")
        return ""

    def close(self) -> None:
        # SIGKILL: ctr attach forwards SIGTERM/SIGINT to the container.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        if self.pty is not None:
            self.pty.close(force=True)
        if self.proc is not None:
            self.proc.wait(timeout=TIMEOUT)
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


@contextlib.contextmanager
def attached(ctrd: Containerd, cid: str, *, tty: bool) -> Iterator[Attach]:
    a = Attach(ctrd, cid, tty=tty)
    try:
        yield a
    finally:
        a.close()


def _assert_consecutive(lines: list[tuple[int, str]], pad: int) -> None:
    numbers = [n for n, _ in lines]
    gaps = [(a, b) for a, b in itertools.pairwise(numbers) if b != a + 1]
    assert not gaps, f"lines lost or repeated: {gaps[:5]}"
    assert all(len(p) == pad for _, p in lines), "a line was cut"


@pytest.mark.parametrize("tty", [False, True], ids=["pipes", "tty"])
def test_containerd_killed_while_a_container_prints(
    containerd: Containerd, busybox_image: str, tty: bool
) -> None:
    run = _start(containerd, "printer", tty=tty)
    containerd.kill9(start_again=False)
    before = _counter(run.pid)
    state = _shim_state(containerd, run.cid)
    assert (state.status, state.pid) == (types_pb2.RUNNING, run.pid)
    time.sleep(DOWNTIME)
    during = _counter(run.pid)
    # About 40 lines in 2 s; a loaded machine may manage fewer, a stall none.
    assert during >= before + 5, (
        f"the container stalled while containerd was down: {before} -> {during}"
    )
    assert not gone(run.pid) and not gone(run.shim)

    containerd.start()
    assert _task(containerd, run.cid) == (run.pid, "RUNNING")
    assert _shim_pid(containerd, run.cid) == run.shim
    at_restart = _counter(run.pid)
    with attached(containerd, run.cid, tty=tty) as a:
        lines = a.read_until(lambda ls: bool(ls) and ls[-1][0] > at_restart + 5)
    # Everything since the start was still buffered (nobody read it): the lines
    # written while containerd was down are there, then the later ones, in order.
    assert lines[0][0] <= before
    _assert_consecutive(lines, 0)
    assert _task(containerd, run.cid) == (run.pid, "RUNNING")
    # The attach going away hurts nobody either.
    after = _counter(run.pid)
    _wait("the container to keep printing", lambda: _counter(run.pid) > after + 3)


def test_full_fifo_while_containerd_is_down_holds_output_back_then_resumes(
    containerd: Containerd, busybox_image: str
) -> None:
    run = _start(containerd, "flood", tty=False, pad=BIG_PAD)
    containerd.kill9(start_again=False)
    before = _counter(run.pid)

    def stalled() -> int:
        first = _counter(run.pid)
        time.sleep(1.0)  # 20 lines' worth
        return first if first and _counter(run.pid) == first else 0

    held = _wait("the full fifo to hold the container back", stalled)
    # Waiting for room, not dropping: roughly what the pipe, one shim read and the
    # fifo hold (3 x 64 KiB), and certainly not the 20+ lines a second it would write.
    assert held * (BIG_PAD + 12) < 8 * 65536, held
    assert not gone(run.pid) and not gone(run.shim)
    t0 = time.monotonic()
    state = _shim_state(containerd, run.cid)
    assert time.monotonic() - t0 < 2.0
    assert (state.status, state.pid) == (types_pb2.RUNNING, run.pid)

    containerd.start()
    assert _task(containerd, run.cid) == (run.pid, "RUNNING")
    assert _shim_pid(containerd, run.cid) == run.shim
    with attached(containerd, run.cid, tty=False) as a:
        lines = a.read_until(lambda ls: bool(ls) and ls[-1][0] > held + 20)
    assert lines[0][0] <= before, "output from before the outage was dropped"
    _assert_consecutive(lines, BIG_PAD)
    assert _task(containerd, run.cid) == (run.pid, "RUNNING")
