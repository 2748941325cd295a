"""Regression tests for what the crash harness found (shim and pyshimd fixes), and for
the harness's own plan and checks. No root or containerd needed."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message

from crashtest.plan import generate
from crashtest.result import Report
from crashtest.runner import Container, ProcState, Runner
from manager.service import EventsService
from protocol.proto import anyutil, timeutil
from protocol.proto.events import forward_pb2
from protocol.proto.events import task_pb2 as events_pb2
from protocol.proto.task.v2 import shim_pb2
from protocol.ttrpc.server import RequestContext
from protocol.ttrpc.status import TtrpcError
from shim.boot.delete import remove_dead_socket
from shim.events import OUTBOX_LOG, Publisher
from shim.reaper import Reaper
from shim.records.recordlog import log_path, read_live
from shim.task.process import DurableEventSink
from tests.unit.shim.task.test_service import make_harness
from tests.unit.shim.test_events import FakeContainerd


def _publisher(path: str, **kw: Any) -> Publisher:
    return Publisher(
        namespace="ns1",
        ttrpc_address=path,
        publish_binary=None,
        containerd_address=None,
        reaper=Reaper(),
        backoff_step=kw.get("backoff_step", 0.01),
        backoff_max=kw.get("backoff_max", 0.02),
        max_attempts=kw.get("max_attempts", 2),
    )


def _exit(cid: str, status: int) -> events_pb2.TaskExit:
    return events_pb2.TaskExit(container_id=cid, id=cid, pid=42, exit_status=status)


def _outbox(bundle: Path) -> list[str]:
    """The topics of the events still waiting in ``bundle``'s outbox, in order."""
    live = read_live(log_path(str(bundle), OUTBOX_LOG))
    return [forward_pb2.Envelope.FromString(p).topic for _, p in live]


def outbox_path(bundle: str) -> Path:
    return Path(log_path(bundle, OUTBOX_LOG))


async def test_exit_is_in_the_outbox_until_acknowledged(tmp_path: Path) -> None:
    ctrd = FakeContainerd(str(tmp_path / "ttrpc.sock"))  # not started: the daemon is down
    bundle = tmp_path / "b1"
    bundle.mkdir()
    pub = _publisher(ctrd.path)
    pub.attach("c1", str(bundle))
    pub.publish("/tasks/exit", _exit("c1", 3))
    assert len(_outbox(bundle)) == 1
    # Far more failures than max_attempts: a persisted exit is never given up on.
    await asyncio.sleep(0.3)
    assert pub.dropped == 0 and pub.pending == 1
    await ctrd.start()
    try:
        await ctrd.wait_for(1)
        await pub.close()
    finally:
        await ctrd.stop()
    assert anyutil.unpack(ctrd.received[0].event, events_pb2.TaskExit).exit_status == 3
    assert _outbox(bundle) == []


async def test_a_later_publisher_replays_the_outbox_in_order(tmp_path: Path) -> None:
    ctrd = FakeContainerd(str(tmp_path / "ttrpc.sock"))
    bundle = tmp_path / "b1"
    bundle.mkdir()
    first = _publisher(ctrd.path)
    first.attach("c1", str(bundle))
    for topic, ev in (
        ("/tasks/create", events_pb2.TaskCreate(container_id="c1")),
        ("/tasks/start", events_pb2.TaskStart(container_id="c1", pid=42)),
        ("/tasks/exit", _exit("c1", 7)),
    ):
        first.publish(topic, ev)
    await first.close(timeout=0.05)  # the shim goes away with nothing delivered
    assert len(_outbox(bundle)) == 3
    await ctrd.start()
    try:
        second = _publisher(ctrd.path)
        assert second.attach("c1", str(bundle)) == 3
        second.publish("/tasks/delete", events_pb2.TaskDelete(container_id="c1", exit_status=7))
        await ctrd.wait_for(4)
        await second.close()
    finally:
        await ctrd.stop()
    assert ctrd.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    assert _outbox(bundle) == []


async def test_the_outbox_is_not_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only a kernel crash loses an unsynced entry, and it takes the containers and
    # containerd's state with it; a shim crash loses nothing (see shim/events.py).
    fsyncs: list[int] = []
    monkeypatch.setattr(os, "fsync", fsyncs.append)
    monkeypatch.setattr(os, "fdatasync", fsyncs.append)
    bundle = tmp_path / "b1"
    bundle.mkdir()
    pub = _publisher(str(tmp_path / "ttrpc.sock"))
    pub.attach("c1", str(bundle))
    pub.publish("/tasks/exit", _exit("c1", 3))
    assert fsyncs == []
    assert _outbox(bundle) == ["/tasks/exit"]
    await pub.close(timeout=0.05)


async def _left_by_a_dead_shim(tmp_path: Path, bundle: Path, *statuses: int) -> None:
    first = _publisher(str(tmp_path / "nobody.sock"))
    first.attach("c1", str(bundle))
    for status in statuses:
        first.publish("/tasks/exit", _exit("c1", status))
    await first.close(timeout=0.05)


async def _replayed(tmp_path: Path, bundle: Path, expect: int) -> list[int]:
    """Exit statuses a second shim attaching ``bundle`` delivers."""
    ctrd = FakeContainerd(str(tmp_path / "ttrpc.sock"))
    await ctrd.start()
    try:
        second = _publisher(ctrd.path)
        assert second.attach("c1", str(bundle)) == expect
        await ctrd.wait_for(expect)
        await second.close()
    finally:
        await ctrd.stop()
    return [anyutil.unpack(e.event, events_pb2.TaskExit).exit_status for e in ctrd.received]


async def test_replay_stops_at_a_torn_record_and_drops_it(tmp_path: Path) -> None:
    bundle = tmp_path / "b1"
    bundle.mkdir()
    await _left_by_a_dead_shim(tmp_path, bundle, 7, 8)
    log = outbox_path(str(bundle))
    whole = log.read_bytes()
    # What a kernel crash can leave of unsynced appends: the last record cut short, or
    # zeros where the file grew but its data never reached the disk.
    for tail in (whole[: len(whole) - 3], whole + bytes(40)):
        log.write_bytes(tail)
        expect = [7] if len(tail) < len(whole) else [7, 8]
        assert await _replayed(tmp_path, bundle, len(expect)) == expect
        assert _outbox(bundle) == [] and log.stat().st_size == 0


async def test_replay_skips_a_record_that_fails_its_checksum(tmp_path: Path) -> None:
    bundle = tmp_path / "b1"
    bundle.mkdir()
    await _left_by_a_dead_shim(tmp_path, bundle, 7, 8)
    log = outbox_path(str(bundle))
    data = bytearray(log.read_bytes())
    data[-1] ^= 0xFF  # the second event's last byte
    log.write_bytes(bytes(data))
    assert await _replayed(tmp_path, bundle, 1) == [7]


async def test_acknowledged_events_are_not_replayed(tmp_path: Path) -> None:
    ctrd = FakeContainerd(str(tmp_path / "ttrpc.sock"))
    bundle = tmp_path / "b1"
    bundle.mkdir()
    await ctrd.start()
    try:
        first = _publisher(ctrd.path)
        first.attach("c1", str(bundle))
        first.publish("/tasks/exit", _exit("c1", 1))
        async with asyncio.timeout(10):
            while first.sent < 1:
                await asyncio.sleep(0.01)
    finally:
        await ctrd.stop()
    # containerd is gone: the next two wait in the log behind the delivered one.
    first.publish("/tasks/exit", _exit("c1", 2))
    first.publish("/tasks/exit", _exit("c1", 3))
    await first.close(timeout=0.05)
    assert _outbox(bundle) == ["/tasks/exit", "/tasks/exit"]
    assert await _replayed(tmp_path, bundle, 2) == [2, 3]


@pytest.mark.parametrize("planted", ["symlink", "fifo"])
async def test_a_planted_outbox_is_refused_and_events_still_flow(
    tmp_path: Path, planted: str
) -> None:
    bundle = tmp_path / "b1"
    (bundle / "pyshim").mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.write_bytes(b"keep")
    log = outbox_path(str(bundle))
    if planted == "symlink":
        log.symlink_to(secret)
    else:
        os.mkfifo(log)
    ctrd = FakeContainerd(str(tmp_path / "ttrpc.sock"))
    await ctrd.start()
    try:
        pub = _publisher(ctrd.path)
        assert pub.attach("c1", str(bundle)) == 0
        pub.publish("/tasks/exit", _exit("c1", 4))
        await ctrd.wait_for(1)
        await pub.close()
    finally:
        await ctrd.stop()
    assert secret.read_bytes() == b"keep"


async def test_events_a_shim_before_the_log_left_are_adopted_in_order(tmp_path: Path) -> None:
    bundle = tmp_path / "b1"
    legacy = bundle / "pyshim" / "outbox"
    legacy.mkdir(parents=True)
    secret = tmp_path / "secret"

    def envelope(status: int) -> bytes:
        return _forward(_exit("c1", status)).envelope.SerializeToString()

    # A file per event, named <time>-<seq>.pb; what a kernel crash could leave of one
    # (empty, torn) and what only someone else can have put there are skipped.
    (legacy / "00000000000000000002-00000001.pb").write_bytes(envelope(6))
    (legacy / "00000000000000000001-00000005.pb").write_bytes(envelope(5))
    (legacy / "00000000000000000003-00000000.pb").write_bytes(b"")
    (legacy / "00000000000000000004-00000000.pb").write_bytes(envelope(9)[:9])
    secret.write_bytes(envelope(99))
    (legacy / "00000000000000000005-00000000.pb").symlink_to(secret)
    os.mkfifo(legacy / "00000000000000000006-00000000.pb")
    assert await _replayed(tmp_path, bundle, 2) == [5, 6]
    assert not legacy.exists() and secret.exists()
    assert _outbox(bundle) == []


async def test_unwritable_outbox_still_publishes(tmp_path: Path) -> None:
    ctrd = FakeContainerd(str(tmp_path / "ttrpc.sock"))
    await ctrd.start()
    try:
        pub = _publisher(ctrd.path)
        pub.attach("c1", str(tmp_path / "removed-bundle"))  # never created: no outbox
        pub.publish("/tasks/exit", _exit("c1", 1))
        await ctrd.wait_for(1)
        await pub.close()
    finally:
        await ctrd.stop()
    assert not (tmp_path / "removed-bundle").exists()


class _Sup:
    def __init__(self) -> None:
        self.exits: list[tuple[str, str, int, int]] = []

    def on_task_exit(self, cid: str, pid_name: str, status: int, at_ns: int) -> None:
        self.exits.append((cid, pid_name, status, at_ns))


def _forward(ev: Message, topic: str = "/tasks/exit") -> forward_pb2.ForwardRequest:
    env = forward_pb2.Envelope(
        timestamp=timeutil.timestamp_now(), namespace="pyshim", topic=topic, event=anyutil.pack(ev)
    )
    return forward_pb2.ForwardRequest(envelope=env)


async def test_pyshimd_ignores_a_replayed_exit() -> None:
    sup = _Sup()
    svc = EventsService(sup)  # type: ignore[arg-type]
    ctx = RequestContext(service="s", method="Forward", metadata={}, deadline=None, stream_id=1)
    ev = _exit("c1", 3)
    ev.exited_at.CopyFrom(timeutil.timestamp_from_ns(1_700_000_000_000_000_000))
    await svc.forward(ctx, _forward(ev))
    await svc.forward(ctx, _forward(ev))  # the same exit, replayed from the outbox
    later = _exit("c1", 3)
    later.exited_at.CopyFrom(timeutil.timestamp_from_ns(1_700_000_001_000_000_000))
    await svc.forward(ctx, _forward(later))  # a different exit (another run): passed on
    assert [e[3] for e in sup.exits] == [1_700_000_000_000_000_000, 1_700_000_001_000_000_000]
    assert svc.duplicates == 1


def test_delete_removes_the_socket_of_a_dead_shim(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir()
    dead = str(tmp_path / "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(dead)
    s.close()  # what SIGKILL leaves: the file, nobody listening
    (bundle / "address").write_text(f"unix://{dead}")
    remove_dead_socket(str(bundle))
    assert not os.path.exists(dead)


def test_delete_keeps_the_socket_of_a_live_shim(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir()
    live = str(tmp_path / "live.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(live)
        s.listen()
        (bundle / "address").write_text(f"unix://{live}")
        remove_dead_socket(str(bundle))
        assert os.path.exists(live)


async def test_an_empty_shim_nobody_shuts_down_leaves(tmp_path: Path) -> None:
    h = make_harness(tmp_path)
    h.service._empty_grace = 0.05
    pid = await h.run()
    h.reaper.exit(pid, 0)
    await h.service.wait(shim_pb2.WaitRequest(id="c1"))
    await h.service.delete(shim_pb2.DeleteRequest(id="c1"))
    assert h.shutdowns == []
    await asyncio.sleep(0.2)  # no Shutdown came (containerd died after Delete)
    assert h.shutdowns == [True]


async def test_a_new_create_keeps_an_emptied_shim(tmp_path: Path) -> None:
    h = make_harness(tmp_path)
    h.service._empty_grace = 0.05
    pid = await h.run()
    h.reaper.exit(pid, 0)
    await h.service.wait(shim_pb2.WaitRequest(id="c1"))
    await h.service.delete(shim_pb2.DeleteRequest(id="c1"))
    await h.create("c2", h.bundle("b2"))
    await asyncio.sleep(0.2)
    assert h.shutdowns == []


class _DurableSink:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def publish(self, topic: str, event: Message) -> None:
        self.calls.append(topic)

    def attach(self, container_id: str, bundle: str) -> int:
        self.calls.append(f"attach {container_id}")
        return 0

    def detach(self, container_id: str) -> None:
        self.calls.append(f"detach {container_id}")


async def test_service_attaches_before_create_and_detaches_after_delete(tmp_path: Path) -> None:
    sink = _DurableSink()
    assert isinstance(sink, DurableEventSink)
    h = make_harness(tmp_path)
    h.service._durable = sink
    h.service._toolkit = dataclasses.replace(h.service._toolkit, events=sink)
    pid = await h.run()
    h.reaper.exit(pid, 0)
    await h.service.wait(shim_pb2.WaitRequest(id="c1"))
    await h.service.delete(shim_pb2.DeleteRequest(id="c1"))
    assert sink.calls[0] == "attach c1"
    assert sink.calls.index("/tasks/create") > 0
    assert sink.calls[-1] == "detach c1"
    assert sink.calls.index("/tasks/delete") < len(sink.calls) - 1


# -- the harness itself -----------------------------------------------------------------


def test_plan_is_a_pure_function_of_the_seed() -> None:
    assert generate(5, 80, 20).dump() == generate(5, 80, 20).dump()
    assert generate(5, 80, 20).dump() != generate(6, 80, 20).dump()
    plan = generate(5, 80, 20)
    assert sum(1 for s in plan.steps if s.fault) == 20
    # Every container the plan runs, it also deletes.
    runs = {s.op.slot for s in plan.steps if s.op.kind == "run"}
    assert runs == {s.op.slot for s in plan.steps if s.op.kind == "delete"}


def _checker() -> Runner:
    r = Runner.__new__(Runner)
    r.plan = generate(1, 0, 0)
    r.log = lambda _m: None
    r.report = Report("fake", "fake", 1)
    return r


def test_checker_flags_two_different_exits_and_a_wrong_one() -> None:
    r = _checker()
    c = Container("c0", "exit", ProcState(acceptable={3}))
    c.init.observations = [(3, "ctr task delete", 5), (137, "event /tasks/exit", -1)]
    r._check_exits(c)
    kinds = sorted(v.kind for v in r.report.violations)
    assert kinds == ["exit-twice", "exit-wrong"]


def test_checker_accepts_137_only_after_the_shim_was_killed() -> None:
    r = _checker()
    c = Container("c0", "exit", ProcState(acceptable={3}))
    c.init.observations = [(137, "ctr task delete", 5)]
    r._check_exits(c)
    assert [v.kind for v in r.report.violations] == ["exit-wrong"]
    r = _checker()
    c.init.lenient.add(137)  # what the runner does when it SIGKILLs the shim
    r._check_exits(c)
    assert r.report.violations == []
    # Allowed, but the real status was lost: the report says so.
    assert [d.kind for d in r.report.degraded] == ["exit-lost-to-137"]


def test_checker_flags_a_lost_exit() -> None:
    r = _checker()
    r._check_exits(Container("c0", "serve", ProcState(acceptable={137})))
    assert [v.kind for v in r.report.violations] == ["exit-unknown"]


async def test_a_shim_never_sent_create_leaves(tmp_path: Path) -> None:
    from shim.task.service import TaskService
    from tests.unit.shim.task.test_service import FakePublisher, FakeReaper

    shutdowns: list[bool] = []
    TaskService(
        namespace="ns",
        publisher=FakePublisher(),
        reaper=FakeReaper(),  # type: ignore[arg-type]
        request_shutdown=lambda: shutdowns.append(True),
        make_runtime=lambda options, bundle: None,  # type: ignore[arg-type,return-value]
        start_grace=0.05,
    )
    await asyncio.sleep(0.2)  # containerd died between `start` and Create
    assert shutdowns == [True]


async def test_delete_during_an_inflight_create_waits_and_deletes(tmp_path: Path) -> None:
    h = make_harness(tmp_path)
    release = asyncio.Event()

    async def slow_runc() -> None:
        await release.wait()

    h.shared.hooks["create"] = slow_runc
    creating = asyncio.create_task(h.create())
    await asyncio.sleep(0.05)
    # containerd's client went away mid-Create; containerd cleans up with Delete.
    deleting = asyncio.create_task(h.service.delete(shim_pb2.DeleteRequest(id="c1")))
    await asyncio.sleep(0.05)
    assert not deleting.done()
    release.set()
    await creating
    await deleting
    assert "delete" in h.shared.names()
    await h.service.shutdown(shim_pb2.ShutdownRequest(id="c1"))
    assert h.shutdowns == [True]


def _fake_v1_root(tmp: Path) -> Path:
    root = tmp / "cgroup"
    for controller in ("cpuset", "memory"):
        (root / controller).mkdir(parents=True)
    (root / "cpu").symlink_to(root / "memory")  # like cpu -> cpu,cpuacct
    return root


def _bundle_with_cgroup(tmp: Path, cgroups_path: str) -> Path:
    bundle = tmp / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(
        '{"linux": {"cgroupsPath": "%s"}}' % cgroups_path  # noqa: UP031
    )
    return bundle


def test_delete_removes_the_cgroup_a_dying_runc_create_left(tmp_path: Path) -> None:
    from shim.boot.delete import remove_cgroup

    root = _fake_v1_root(tmp_path)
    # runc got as far as cpuset (and an empty child) before it died with the shim.
    (root / "cpuset" / "ns" / "c1" / "sub").mkdir(parents=True)
    (root / "cpuset" / "ns" / "other").mkdir(parents=True)
    bundle = _bundle_with_cgroup(tmp_path, "/ns/c1")
    remove_cgroup(str(bundle), root=str(root))
    assert not (root / "cpuset" / "ns" / "c1").exists()
    assert (root / "cpuset" / "ns" / "other").is_dir()  # someone else's: untouched


def test_delete_leaves_systemd_cgroups_alone(tmp_path: Path) -> None:
    from shim.boot.delete import remove_cgroup

    root = _fake_v1_root(tmp_path)
    (root / "cpuset" / "system.slice").mkdir()
    bundle = _bundle_with_cgroup(tmp_path, "system.slice:pyshim:c1")
    remove_cgroup(str(bundle), root=str(root))
    assert (root / "cpuset" / "system.slice").is_dir()


async def test_a_shim_whose_create_failed_leaves(tmp_path: Path) -> None:
    h = make_harness(tmp_path)
    h.service._empty_grace = 0.05
    h.shared.failures["create"] = "runc create failed"  # e.g. containerd died mid-Create
    with pytest.raises(TtrpcError):
        await h.create()
    await asyncio.sleep(0.2)
    assert h.shutdowns == [True]
