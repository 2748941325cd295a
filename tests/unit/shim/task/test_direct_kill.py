"""Kill of an init the shim created: a direct signal instead of `runc kill`, when safe.

The service tests use a fake signaller (the fake runtime's pids are not processes);
``signal_own_child`` itself is tested against real children of the test process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.proto.task.v2 import shim_pb2
from protocol.proto.types import task_pb2 as types_pb2
from protocol.ttrpc.status import Code
from shim.task.process import signal_own_child
from tests.unit.shim.task.test_service import Harness, expect_error, make_harness, settle

NF_FINISHED = "process already finished: not found"


class FakeSignaller:
    """Records (pid, signal); answers as told: True, False or ProcessLookupError."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int]] = []
        self.answer: bool | type[ProcessLookupError] = True

    def __call__(self, pid: int, sig: int) -> bool:
        self.sent.append((pid, sig))
        if self.answer is ProcessLookupError:
            raise ProcessLookupError(3, "gone")
        return bool(self.answer)


@pytest.fixture
def signaller() -> FakeSignaller:
    return FakeSignaller()


@pytest.fixture
def h(tmp_path: Path, signaller: FakeSignaller) -> Harness:
    return make_harness(tmp_path, signal_child=signaller)


def runc_kills(h: Harness) -> list[tuple[object, ...]]:
    return [c for c in h.shared.calls if c[0] == "kill"]


async def kill(h: Harness, sig: int, *, all: bool = False) -> None:
    await h.service.kill(shim_pb2.KillRequest(id="c1", signal=sig, all=all))


# ----------------------------------------------------------------------------- service


async def test_running_init_is_signalled_directly(h: Harness, signaller: FakeSignaller) -> None:
    pid = await h.run()
    await kill(h, 9)
    await kill(h, 0)
    assert signaller.sent == [(pid, 9), (pid, 0)]
    assert runc_kills(h) == []


async def test_created_init_is_signalled_directly(h: Harness, signaller: FakeSignaller) -> None:
    pid = await h.create()
    await kill(h, 15)
    assert signaller.sent == [(pid, 15)]
    assert runc_kills(h) == []


async def test_dead_unreaped_init_is_not_found(h: Harness, signaller: FakeSignaller) -> None:
    await h.run()
    signaller.answer = ProcessLookupError
    await expect_error(kill(h, 9), Code.NOT_FOUND, NF_FINISHED)
    assert runc_kills(h) == []


async def test_refused_direct_signal_falls_back_to_runc(
    h: Harness, signaller: FakeSignaller
) -> None:
    pid = await h.run()
    signaller.answer = False
    await kill(h, 9)
    assert signaller.sent == [(pid, 9)]
    assert runc_kills(h) == [("kill", "c1", 9, False)]
    # The runtime's error is mapped exactly as before.
    h.shared.failures["kill"] = "unable to signal init: invalid argument"
    await expect_error(
        kill(h, 99),
        Code.UNKNOWN,
        "unknown error after kill: unable to signal init: invalid argument",
    )


async def test_kill_all_uses_runc(h: Harness, signaller: FakeSignaller) -> None:
    await h.run()
    await kill(h, 9, all=True)
    assert signaller.sent == []
    assert runc_kills(h) == [("kill", "c1", 9, True)]


async def test_reaped_init_is_answered_without_signal_or_runc(
    h: Harness, signaller: FakeSignaller
) -> None:
    pid = await h.run()
    h.reaper.exit(pid, 0)
    # Reaped but the exit not yet recorded: the pid may already be someone else's, and
    # runc would answer "container not running".
    await expect_error(kill(h, 9), Code.NOT_FOUND, NF_FINISHED)
    await h.service.wait(shim_pb2.WaitRequest(id="c1"))
    await expect_error(kill(h, 9), Code.NOT_FOUND, NF_FINISHED)
    assert signaller.sent == []
    assert runc_kills(h) == []
    # --all may still find processes in the cgroup.
    await kill(h, 9, all=True)
    assert runc_kills(h) == [("kill", "c1", 9, True)]


async def test_paused_and_pausing_init_use_runc(h: Harness, signaller: FakeSignaller) -> None:
    await h.run()
    await h.service.pause(shim_pb2.PauseRequest(id="c1"))
    assert (await h.state()).status == types_pb2.PAUSED
    await kill(h, 9)
    assert runc_kills(h) == [("kill", "c1", 9, False)]
    await h.service.resume(shim_pb2.ResumeRequest(id="c1"))

    entered = asyncio.Event()
    release = asyncio.Event()

    async def slow_pause() -> None:
        entered.set()
        await release.wait()

    h.shared.hooks["pause"] = slow_pause
    pausing = asyncio.create_task(h.service.pause(shim_pb2.PauseRequest(id="c1")))
    await entered.wait()
    assert (await h.state()).status == types_pb2.PAUSING
    await kill(h, 15)
    release.set()
    await pausing
    assert signaller.sent == []
    assert runc_kills(h) == [("kill", "c1", 9, False), ("kill", "c1", 15, False)]


async def test_recovered_init_uses_runc(tmp_path: Path) -> None:
    first = make_harness(tmp_path, signal_child=FakeSignaller())
    pid = await first.run()
    bundle = first.service._containers["c1"].bundle

    signaller = FakeSignaller()
    second = make_harness(tmp_path, signal_child=signaller)
    second.shared.runc_state = {"status": "running", "pid": pid}
    assert await second.service.recover(bundle)
    await second.service.kill(shim_pb2.KillRequest(id="c1", signal=9))
    assert signaller.sent == []
    assert runc_kills(second) == [("kill", "c1", 9, False)]


async def test_deleted_init_is_not_found(h: Harness, signaller: FakeSignaller) -> None:
    pid = await h.create()
    await h.service.delete(shim_pb2.DeleteRequest(id="c1"))
    h.reaper.exit(pid, 137)
    await settle()
    await expect_error(kill(h, 9), Code.NOT_FOUND, "container not created: not found")
    assert signaller.sent == []


# ----------------------------------------------------------------------------- real children


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "100"])
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()


def wait_zombie(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rpartition(b")")[2].split()[0] == b"Z":
                return
        time.sleep(0.01)
    pytest.fail(f"{pid} did not die")


def test_signal_own_child_delivers(child: subprocess.Popen[bytes]) -> None:
    assert signal_own_child(child.pid, 0)
    assert signal_own_child(child.pid, signal.SIGTERM)
    assert child.wait(timeout=5) == -signal.SIGTERM


def test_signal_own_child_reports_unreaped_death(child: subprocess.Popen[bytes]) -> None:
    os.kill(child.pid, signal.SIGKILL)
    wait_zombie(child.pid)
    with pytest.raises(ProcessLookupError):
        signal_own_child(child.pid, signal.SIGTERM)
    assert child.wait(timeout=5) == -signal.SIGKILL


def test_signal_own_child_refuses_bad_signal_numbers(child: subprocess.Popen[bytes]) -> None:
    for bad in (-1, 65, 1 << 40):
        assert not signal_own_child(child.pid, bad)
    assert child.poll() is None


def test_signal_own_child_leaves_other_processes_alone(child: subprocess.Popen[bytes]) -> None:
    # Our parent and pid 1 are not our children; a grandchild is not either.
    assert not signal_own_child(os.getppid(), 0)
    assert not signal_own_child(1, 0)
    grandparent = subprocess.Popen(
        ["sh", "-c", "sleep 100 & echo $!; wait"], stdout=subprocess.PIPE
    )
    grandchild = 0
    try:
        assert grandparent.stdout is not None
        grandchild = int(grandparent.stdout.readline())
        assert not signal_own_child(grandchild, signal.SIGKILL)
        assert Path(f"/proc/{grandchild}").exists()
    finally:
        if grandchild:
            os.kill(grandchild, signal.SIGKILL)
        grandparent.kill()
        grandparent.wait()
    child.kill()
    child.wait()
    # Reaped and gone: nothing to signal, and nothing sent.
    assert not signal_own_child(child.pid, 0)
