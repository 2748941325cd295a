"""Exits: early exits, event order, persistence before publish, execs, recovery."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message

from protocol.proto.task.v2 import shim_pb2
from protocol.proto.timeutil import ns_from_timestamp
from protocol.proto.types import task_pb2 as types_pb2
from protocol.ttrpc.status import Code
from shim.records.state import ExitLog, ExitRecord
from shim.task.exits import ExitRouter
from tests.unit.shim.task.test_service import Harness, expect_error, make_harness, settle


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return make_harness(tmp_path)


def exit_while_runc_runs(
    h: Harness, pid: Callable[[], int], status: int
) -> Callable[[], Awaitable[None]]:
    """A hook: the process dies while runc has not returned yet (runc keeps running)."""

    async def hook() -> None:
        h.reaper.exit(pid(), status)
        await settle()

    return hook


def exits(h: Harness) -> list[tuple[str, int]]:
    return [(e.id, e.exit_status) for t, e in h.publisher.events if t == "/tasks/exit"]  # type: ignore[attr-defined]


async def test_init_exit_during_start_is_published_after_start(h: Harness) -> None:
    pid = await h.create()
    h.shared.hooks["start"] = exit_while_runc_runs(h, lambda: pid, 0)
    await h.service.start(shim_pb2.StartRequest(id="c1"))
    resp = await asyncio.wait_for(h.service.wait(shim_pb2.WaitRequest(id="c1")), 5)
    assert resp.exit_status == 0
    assert h.publisher.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit"]
    exit_event = h.publisher.events[-1][1]
    assert (exit_event.container_id, exit_event.id, exit_event.pid) == ("c1", "c1", pid)  # type: ignore[attr-defined]


async def test_init_exit_before_pid_is_known(h: Harness) -> None:
    # runc create's child dies before runc even returns (and before the pid file is read).
    h.shared.hooks["create"] = exit_while_runc_runs(h, lambda: h.shared.next_pid, 1)
    await h.create()
    resp = await asyncio.wait_for(h.service.wait(shim_pb2.WaitRequest(id="c1")), 5)
    assert resp.exit_status == 1
    assert h.publisher.topics() == ["/tasks/create", "/tasks/exit"]
    assert (await h.state()).status == types_pb2.STOPPED


async def test_exec_exit_before_pid_is_known(h: Harness) -> None:
    await h.run()
    await h.exec()
    # The fake writes the pid file, then calls the hook: the exec dies inside runc exec.
    h.shared.hooks["exec"] = exit_while_runc_runs(h, lambda: h.shared.next_pid - 1, 7)
    pid = (await h.service.start(shim_pb2.StartRequest(id="c1", exec_id="e1"))).pid
    resp = await asyncio.wait_for(h.service.wait(shim_pb2.WaitRequest(id="c1", exec_id="e1")), 5)
    assert resp.exit_status == 7
    assert h.publisher.topics()[-3:] == ["/tasks/exec-added", "/tasks/exec-started", "/tasks/exit"]
    assert exits(h) == [("e1", 7)]
    started = h.publisher.events[-2][1]
    assert started.pid == pid  # type: ignore[attr-defined]


async def test_unknown_pids_outside_a_start_are_ignored(h: Harness) -> None:
    await h.run()
    h.reaper.exit(4242, 0)
    await settle()
    assert exits(h) == []
    # A later exec that happens to get that pid must not inherit the stale exit.
    await h.exec()
    h.shared.next_pid = 4242
    await h.service.start(shim_pb2.StartRequest(id="c1", exec_id="e1"))
    await settle()
    assert (await h.state("c1", "e1")).status == types_pb2.RUNNING


async def test_an_exit_that_cannot_be_recorded_is_still_told(
    h: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A full disk loses the record, never the exit: publishing it and answering Wait
    # is what containerd needs now; the record is for a later shim.
    def full(self: ExitLog, record: ExitRecord) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ExitLog, "record", full)
    pid = await h.run()
    h.reaper.exit(pid, 9)
    resp = await h.service.wait(shim_pb2.WaitRequest(id="c1"))
    assert resp.exit_status == 9
    assert exits(h) == [("c1", 9)]
    assert "cannot persist the exit of c1" in caplog.text
    assert (await h.state("c1")).status == types_pb2.STOPPED


async def test_exit_is_persisted_before_publish_and_wait(h: Harness) -> None:
    pid = await h.run()
    bundle = h.service._containers["c1"].bundle
    at_publish: list[ExitRecord | None] = []

    def check(topic: str, event: Message) -> None:
        if topic == "/tasks/exit":
            exits, records = ExitLog.load(bundle, "c1")
            exits.close()
            at_publish.append(records.get("c1"))

    h.publisher.on_publish = check
    waiter = asyncio.create_task(h.service.wait(shim_pb2.WaitRequest(id="c1")))
    await settle()
    h.reaper.exit(pid, 137)
    resp = await waiter
    record = at_publish[0]
    assert record is not None
    assert (record.container_id, record.exec_id, record.pid, record.exit_status) == (
        "c1",
        "",
        pid,
        137,
    )
    assert record.exited_at_ns == ns_from_timestamp(resp.exited_at)
    assert h.shared.ios[0].drained >= 1


async def test_init_exit_waits_for_running_execs(h: Harness) -> None:
    pid = await h.run(bundle=h.bundle(pid_ns=False))
    await h.exec("c1", "e1")
    await h.exec("c1", "e2")  # never started: must not hold the init back
    exec_pid = (await h.service.start(shim_pb2.StartRequest(id="c1", exec_id="e1"))).pid
    h.reaper.exit(pid, 0)
    await settle()
    # No private pid namespace: the rest of the container is killed.
    assert ("kill", "c1", 9, True) in h.shared.calls
    assert exits(h) == []
    assert (await h.state()).status == types_pb2.RUNNING
    await expect_error(
        h.service.start(shim_pb2.StartRequest(id="c1", exec_id="e2")),
        Code.FAILED_PRECONDITION,
        "container c1 init process is not running: failed precondition",
    )
    h.reaper.exit(exec_pid, 137)
    await asyncio.wait_for(h.service.wait(shim_pb2.WaitRequest(id="c1")), 5)
    assert exits(h) == [("e1", 137), ("c1", 0)]


async def test_private_pid_namespace_skips_kill_all(h: Harness) -> None:
    pid = await h.run()
    h.reaper.exit(pid, 0)
    await asyncio.wait_for(h.service.wait(shim_pb2.WaitRequest(id="c1")), 5)
    assert not any(c[0] == "kill" for c in h.shared.calls)


async def test_paused_init_exit_resumes_first(h: Harness) -> None:
    pid = await h.run()
    await h.service.pause(shim_pb2.PauseRequest(id="c1"))
    h.reaper.exit(pid, 137)
    await asyncio.wait_for(h.service.wait(shim_pb2.WaitRequest(id="c1")), 5)
    assert h.shared.names()[-1] == "resume"
    assert (await h.state()).status == types_pb2.STOPPED


async def test_exec_lifecycle_and_errors(h: Harness) -> None:
    await h.run()
    await h.exec(terminal=True)
    assert h.shared.exec_specs == []
    await expect_error(h.exec(), Code.ALREADY_EXISTS, "id e1: already exists")
    await expect_error(
        h.service.exec(shim_pb2.ExecProcessRequest(id="c1", exec_id="e2")),
        Code.INVALID_ARGUMENT,
        "exec process spec is required",
    )
    await expect_error(
        h.service.exec(
            shim_pb2.ExecProcessRequest(
                id="c1", exec_id="e3", spec=any_pb2.Any(type_url="x", value=b"[")
            )
        ),
        Code.INVALID_ARGUMENT,
        "invalid exec process spec: Expecting value: line 1 column 2 (char 1)",
    )
    st = await h.state("c1", "e1")
    assert (st.id, st.exec_id, st.status, st.pid, st.terminal) == (
        "e1",
        "e1",
        types_pb2.CREATED,
        0,
        True,
    )
    await expect_error(
        h.service.kill(shim_pb2.KillRequest(id="c1", exec_id="e1", signal=9)),
        Code.FAILED_PRECONDITION,
        "process not created: failed precondition",
    )
    pid = (await h.service.start(shim_pb2.StartRequest(id="c1", exec_id="e1"))).pid
    assert h.shared.exec_specs[0]["terminal"] is True
    pid_file = Path(h.service._containers["c1"].bundle, "e1.pid")
    assert pid_file.read_text() == str(pid)
    await expect_error(
        h.service.start(shim_pb2.StartRequest(id="c1", exec_id="e1")),
        Code.UNKNOWN,
        "cannot start a running process",
    )
    await expect_error(
        h.service.delete(shim_pb2.DeleteRequest(id="c1", exec_id="e1")),
        Code.UNKNOWN,
        "cannot delete a running process",
    )
    h.reaper.exit(pid, 3)
    assert (
        await asyncio.wait_for(h.service.wait(shim_pb2.WaitRequest(id="c1", exec_id="e1")), 5)
    ).exit_status == 3
    await expect_error(
        h.service.kill(shim_pb2.KillRequest(id="c1", exec_id="e1", signal=9)),
        Code.NOT_FOUND,
        "process already finished: not found",
    )
    await expect_error(
        h.service.resize_pty(shim_pb2.ResizePtyRequest(id="c1", exec_id="e1", width=1)),
        Code.UNKNOWN,
        "cannot resize a stopped container",
    )
    n_events = len(h.publisher.events)
    resp = await h.service.delete(shim_pb2.DeleteRequest(id="c1", exec_id="e1"))
    assert (resp.pid, resp.exit_status) == (pid, 3)
    assert len(h.publisher.events) == n_events  # no event for exec deletes
    assert not pid_file.exists()
    await expect_error(h.state("c1", "e1"), Code.NOT_FOUND, "process does not exist e1: not found")


async def test_failed_exec_start_stays_created_and_releases_waiters(h: Harness) -> None:
    await h.run()
    await h.exec()
    waiter = asyncio.create_task(h.service.wait(shim_pb2.WaitRequest(id="c1", exec_id="e1")))
    await settle()
    h.shared.failures["exec"] = "exec: not found"
    await expect_error(
        h.service.start(shim_pb2.StartRequest(id="c1", exec_id="e1")),
        Code.UNKNOWN,
        "OCI runtime exec failed: exec: not found",
    )
    resp = await waiter
    assert resp.exit_status == 0
    assert (await h.state("c1", "e1")).status == types_pb2.CREATED
    assert h.shared.ios[-1].closed
    await h.service.delete(shim_pb2.DeleteRequest(id="c1", exec_id="e1"))


async def test_exec_reports_paused_with_its_init(h: Harness) -> None:
    await h.run()
    await h.exec()
    await h.service.start(shim_pb2.StartRequest(id="c1", exec_id="e1"))
    await h.service.pause(shim_pb2.PauseRequest(id="c1"))
    assert (await h.state("c1", "e1")).status == types_pb2.PAUSED


async def test_concurrent_waiters_all_released(h: Harness) -> None:
    pid = await h.run()
    waiters = [asyncio.create_task(h.service.wait(shim_pb2.WaitRequest(id="c1"))) for _ in range(5)]
    await settle()
    h.reaper.exit(pid, 143)
    assert [(await w).exit_status for w in waiters] == [143] * 5


async def test_recover_after_restart_returns_persisted_exits(tmp_path: Path) -> None:
    first = make_harness(tmp_path)
    pid = await first.run()
    await first.exec()
    exec_pid = (await first.service.start(shim_pb2.StartRequest(id="c1", exec_id="e1"))).pid
    first.reaper.exit(exec_pid, 5)
    first.reaper.exit(pid, 9)
    before = await asyncio.wait_for(first.service.wait(shim_pb2.WaitRequest(id="c1")), 5)
    bundle = first.service._containers["c1"].bundle

    second = make_harness(tmp_path)
    assert await second.service.recover(bundle)
    st = await second.state()
    assert (st.status, st.pid, st.exit_status, st.exited_at) == (
        types_pb2.STOPPED,
        pid,
        9,
        before.exited_at,
    )
    assert (await asyncio.wait_for(second.service.wait(shim_pb2.WaitRequest(id="c1")), 5)) == before
    exec_wait = await asyncio.wait_for(
        second.service.wait(shim_pb2.WaitRequest(id="c1", exec_id="e1")), 5
    )
    assert exec_wait.exit_status == 5
    await second.service.delete(shim_pb2.DeleteRequest(id="c1"))
    assert second.publisher.topics() == ["/tasks/delete"]


async def test_recover_live_container_then_exit(tmp_path: Path) -> None:
    first = make_harness(tmp_path)
    pid = await first.run()
    bundle = first.service._containers["c1"].bundle

    second = make_harness(tmp_path)
    second.shared.runc_state = {"status": "running", "pid": pid}
    assert await second.service.recover(bundle)
    assert (await second.state()).status == types_pb2.RUNNING
    second.reaper.exit(pid, 2)
    assert (
        await asyncio.wait_for(second.service.wait(shim_pb2.WaitRequest(id="c1")), 5)
    ).exit_status == 2
    assert not await second.service.recover(bundle)  # already known


async def test_recover_lost_exit_is_recorded_once(tmp_path: Path) -> None:
    first = make_harness(tmp_path)
    await first.run()
    bundle = first.service._containers["c1"].bundle
    second = make_harness(tmp_path)
    assert await second.service.recover(bundle)
    lost = await second.state()
    assert (lost.status, lost.exit_status) == (types_pb2.STOPPED, 255)
    third = make_harness(tmp_path)
    third.shared.runc_state = {"status": "running"}  # must not override the record
    assert await third.service.recover(bundle)
    assert (await third.state()).exited_at == lost.exited_at


async def test_recover_without_record(tmp_path: Path) -> None:
    h = make_harness(tmp_path)
    assert not await h.service.recover(h.bundle())


def test_router_holds_only_inside_windows() -> None:
    router = ExitRouter()
    router.on_reaped(10, 1)
    with router.window() as w:
        router.on_reaped(11, 2)
        early = router.register(11, _Sink(), w)
        assert early is not None and (early.pid, early.status) == (11, 2)
        assert router.register(10, _Sink(), w) is None
    assert w.exits == {}


class _Sink:
    def reaped(self, exit: object) -> None:
        pass
