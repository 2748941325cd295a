"""Exit bookkeeping of the supervisor: first exit wins, persisted before anyone is told."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from bench.manager_run_path import FakeShim
from manager.images import ImageStore
from manager.launcher import ShimLauncher
from manager.paths import Paths
from manager.records import ContainerRecord, RecordStore
from manager.shimclient import ShimClient
from manager.supervisor import Container, Supervisor, valid_identifier
from protocol.proto.manager.v1 import manager_pb2
from protocol.ttrpc.status import TtrpcError


def _supervisor(tmp_path: Path) -> Supervisor:
    paths = Paths(tmp_path / "run", tmp_path / "state")
    launcher = ShimLauncher(binary="/nonexistent", paths=paths, publish_binary="/nonexistent")
    return Supervisor(paths, RecordStore(paths), launcher, ImageStore(paths.images_dir))


def _add(sup: Supervisor, cid: str, name: str) -> Container:
    rec = ContainerRecord(id=cid, name=name, bundle="/b", created_at_ns=1, command=["x"])
    c = Container(rec)
    sup.containers[cid] = c
    return c


async def test_first_exit_wins_and_is_persisted(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path)
    c = _add(sup, "abc123", "web")
    sup.on_task_exit("abc123", "some-exec", 9, 5)  # an exec's exit is not the container's
    assert not c.exited.is_set()
    sup.on_task_exit("abc123", "abc123", 3, 100)
    assert c.exited.is_set()
    sup.record_exit(c, 137, 200)
    stored = sup.store.load("abc123")
    assert stored is not None
    assert (stored.exit_status, stored.exited_at_ns, stored.status) == (3, 100, "stopped")
    assert await sup.wait("web", "") == (3, 100, "")


async def test_lookup_by_id_name_and_unique_prefix(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path)
    a = _add(sup, "aa11", "one")
    b = _add(sup, "aa22", "two")
    assert sup.lookup("aa11") is a
    assert sup.lookup("two") is b
    assert sup.lookup("aa2") is b
    for ref in ("aa", "nope"):
        try:
            sup.lookup(ref)
        except Exception as exc:
            assert "no such container" in str(exc)
        else:
            raise AssertionError(f"{ref} should not resolve")


def test_identifiers() -> None:
    assert valid_identifier("web-1.a_b")
    for bad in ("", "-a", "a/b", "a..b", "x" * 77, "a b"):
        assert not valid_identifier(bad)


def test_unresponsive_shim_is_found_by_argv_and_only_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    from manager.supervisor import _stop_shim_processes

    fake = tmp_path / "containerd-shim-pyshim-v1"
    fake.write_text("import time\ntime.sleep(60)\n")
    base = [sys.executable, str(fake), "-namespace", "pyshim"]
    ours = subprocess.Popen([*base, "-id", "c1", "-address", "/m.sock"])
    other_mgr = subprocess.Popen([*base, "-id", "c1", "-address", "/other.sock"])
    starting = subprocess.Popen([*base, "-id", "c1", "-address", "/m.sock", "start"])
    try:
        _stop_shim_processes("c1", "/m.sock")
        assert ours.wait(timeout=10) == -9
        assert other_mgr.poll() is None and starting.poll() is None
    finally:
        for p in (ours, other_mgr, starting):
            p.kill()
            p.wait()


def test_an_exit_handled_before_start_returned_is_not_overwritten(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path)
    fast = _add(sup, "f00d", "fast")
    sup.on_task_exit("f00d", "f00d", 0, 100)  # the event overtook Start's reply
    sup._mark_started(fast)
    slow = _add(sup, "5104", "slow")
    sup._mark_started(slow)
    stored = {cid: sup.store.load(cid) for cid in ("f00d", "5104")}
    assert stored["f00d"] is not None and stored["5104"] is not None
    assert (stored["f00d"].status, stored["f00d"].exit_status) == ("stopped", 0)
    assert (stored["5104"].status, stored["5104"].exit_status) == ("running", None)


async def test_stop_during_a_policy_restart_stops_what_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A `stop` that lands while a restart policy is launching the new shim (no exit and
    # no client yet) once failed with "has no running shim"; it must stop the new run.
    sup = _supervisor(tmp_path)
    c = _add(sup, "abc123", "loop")
    c.record.bundle = str(tmp_path / "bundle")
    (tmp_path / "bundle").mkdir()
    sup.record_exit(c, 0, 5)
    gate = asyncio.Event()
    kills: list[int] = []

    class Client:
        closed = False

        async def kill(self, cid: str, sig: int, **_: object) -> None:
            kills.append(sig)
            sup.record_exit(c, 128 + sig, 10)

    async def launch(
        c_: Container, tty_size: tuple[int, int] = (0, 0), checkpoint: str = ""
    ) -> None:
        await gate.wait()
        c_.client = Client()  # type: ignore[assignment]
        c_.record.status = "running"

    async def release(c_: Container) -> None:
        pass

    monkeypatch.setattr(sup, "_launch", launch)
    monkeypatch.setattr(sup, "_release_shim", release)
    restarting = asyncio.create_task(sup._start_again(c))
    await asyncio.sleep(0)
    assert c.lock.locked() and not c.record.exited
    stopping = asyncio.create_task(sup.stop("loop", 1.0))
    await asyncio.sleep(0.05)
    assert not stopping.done()
    gate.set()
    await asyncio.wait_for(asyncio.gather(restarting, stopping), 5)
    assert kills == [c.record.stop_signal]
    assert c.record.exited and c.record.manually_stopped


@pytest.mark.parametrize(
    ("auto_remove", "before_answer", "after_exit"),
    [
        # The first save only: the record, its new directory, the containers dir.
        (True, 3, 0),
        # + the save at Start (record, directory); the exit (record, directory).
        (False, 5, 2),
    ],
)
async def test_fsyncs_on_the_run_path(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    auto_remove: bool,
    before_answer: int,
    after_exit: int,
) -> None:
    # Each fsync is one disk flush on `pyshim run`'s critical path (~5-30 ms on a busy
    # disk): docs/crash-recovery.md says which saves need one. A new one must come
    # with a reason there and a new count here.
    sup = _supervisor(tmp_path)
    sup.paths.containers_dir.mkdir(parents=True)
    shim = FakeShim()

    async def start(self: ShimLauncher, cid: str, bundle: Path) -> str:
        return "unix:///nonexistent"

    async def dial(address: str, fresh: bool = False) -> FakeShim:
        return shim

    monkeypatch.setattr(ShimLauncher, "start", start)
    monkeypatch.setattr(ShimClient, "dial", dial)
    fsyncs: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    cfg = manager_pb2.ContainerConfig(args=["true"], network="none", auto_remove=auto_remove)
    c = await sup.run(cfg)
    assert len(fsyncs) == before_answer
    stored = sup.store.load(c.id)
    assert stored is not None and (stored.status, stored.pid) == ("running", 2)
    shim.exit.set()
    await asyncio.wait_for(c.exited.wait(), 5)
    if auto_remove:
        for _ in range(100):
            if c.id not in sup.containers:
                break
            await asyncio.sleep(0.01)
        assert c.id not in sup.containers
        assert not sup.paths.container_dir(c.id).exists()
    else:
        stored = sup.store.load(c.id)
        assert stored is not None and stored.exit_status == 0
        await sup.remove(c.id, force=False)
    assert len(fsyncs) == before_answer + after_exit


async def test_after_a_power_loss_the_first_save_is_enough(tmp_path: Path) -> None:
    # What a reboot leaves of a `run --rm` that Run answered: the synced first save
    # (status created, no shim address), no snapshot, no bundle. Recovery must still
    # find the container, and remove it with its state directory.
    sup = _supervisor(tmp_path)
    rec = ContainerRecord(
        id="0ff1ce",
        name="gone",
        bundle=str(tmp_path / "run" / "bundles" / "0ff1ce"),
        created_at_ns=1,
        command=["true"],
        auto_remove=True,
    )
    sup.store.save(rec)
    sup.paths.log("0ff1ce").touch()
    await sup.recover()
    for _ in range(100):
        if "0ff1ce" not in sup.containers:
            break
        await asyncio.sleep(0.01)
    assert "0ff1ce" not in sup.containers
    assert not sup.paths.container_dir("0ff1ce").exists()


async def test_a_removal_cut_short_by_a_crash_is_finished_at_recovery(tmp_path: Path) -> None:
    # pyshimd SIGKILLed in `rm`, after the shim was stopped, while the container's
    # files were being removed: the next pyshimd removes the rest, and lists nothing.
    sup = _supervisor(tmp_path)
    for cid in ("d0ne", "ke9t"):
        sup.store.save(
            ContainerRecord(
                id=cid,
                name=cid,
                bundle=str(sup.paths.bundle(cid)),
                created_at_ns=1,
                command=["x"],
                shim_gone=True,
                exit_status=0,
            )
        )
        sup.paths.bundle(cid).mkdir(parents=True)
        sup.paths.fifo_dir(cid).mkdir(parents=True)
    retired = sup.store.retire("d0ne")
    assert retired is not None
    (retired / "record.json").unlink()
    (retired / "overlay" / "upper").mkdir(parents=True)
    unborn = sup.paths.container_dir("0b0e")
    unborn.mkdir()
    after = _supervisor(tmp_path)
    await after.recover()
    assert list(after.containers) == ["ke9t"]
    assert os.listdir(sup.paths.containers_dir) == ["ke9t"]
    assert os.listdir(sup.paths.bundle("ke9t").parent) == ["ke9t"]
    assert os.listdir(sup.paths.fifo_dir("ke9t").parent) == ["ke9t"]


async def test_nothing_that_finishes_after_a_removal_brings_the_container_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sup = _supervisor(tmp_path)
    c = _add(sup, "abc123", "web")
    c.record.bundle = str(sup.paths.bundle("abc123"))
    sup.record_exit(c, 0, 5)
    gate = asyncio.Event()

    async def release(c_: Container) -> None:
        await gate.wait()

    monkeypatch.setattr(sup, "_release_shim", release)
    removing = asyncio.create_task(sup.remove("web", force=True))
    await asyncio.sleep(0.01)
    assert c.lock.locked()
    # A stop that waited for the removal's lock finds no container.
    stopping = asyncio.create_task(sup.stop("web", 1.0))
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.wait_for(removing, 5)
    with pytest.raises(TtrpcError, match="no such container"):
        await asyncio.wait_for(stopping, 5)
    # And a save of the removed record (a task that learned something late) writes
    # nothing: the next pyshimd would list the container again.
    c.record.status = "paused"
    sup.store.save(c.record)
    assert not sup.paths.container_dir("abc123").exists()
    assert os.listdir(sup.paths.containers_dir) == []
