"""Exit bookkeeping of the supervisor: first exit wins, persisted before anyone is told."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from manager.images import ImageStore
from manager.launcher import ShimLauncher
from manager.paths import Paths
from manager.records import ContainerRecord, RecordStore
from manager.supervisor import Container, Supervisor, valid_identifier


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
