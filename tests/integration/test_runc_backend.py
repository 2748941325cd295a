"""The runc backend, the reaper and rootfs mounts against the real runc, as root.

The test process becomes a child subreaper for the duration of each test (as the shim
daemon is), so container inits re-parent to it and the reaper's subscription sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from crashtest.images import build_busybox_rootfs, write_oci_bundle
from protocol.proto.types import mount_pb2
from shim.reaper import Reaper
from shim.sys import syscalls
from shim.task.mount import mount_all, unmount_all
from shim.task.runtime import Runc, RuncOptions, RuntimeFailure
from tests.support.exits import ExitRecorder

pytestmark = pytest.mark.integration

NAMESPACE = "pyshim-test"
TIMEOUT = 20.0
_CGROUP_PARENT = f"pyshim-it-{os.getpid()}"


@dataclass
class Harness(ExitRecorder):
    reaper: Reaper
    root: Path
    tmp: Path
    containers: list[tuple[Runc, str]] = field(default_factory=list)
    mounts: list[Path] = field(default_factory=list)

    def bundle(self, cid: str, args: list[str], *, rootfs: Path | None = None) -> Runc:
        bundle = self.tmp / cid
        write_oci_bundle(bundle, args, rootfs=rootfs, cgroups_path=f"/{_CGROUP_PARENT}/{cid}")
        runc = Runc(self.reaper, RuncOptions(root=str(self.root)), NAMESPACE, str(bundle))
        self.containers.append((runc, cid))
        return runc

    async def create(self, runc: Runc, cid: str, stdout: int | None = None) -> int:
        pid_file = os.path.join(runc.bundle, "init.pid")
        await asyncio.wait_for(
            runc.create(cid, pid_file=pid_file, console_socket=None, stdio=(None, stdout, stdout)),
            TIMEOUT,
        )
        return int(Path(pid_file).read_text())


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    if shutil.which("runc") is None:
        pytest.fail("runc is not installed (apt-get install runc)")
    if os.geteuid() != 0:
        pytest.fail("these tests need root")
    was_subreaper = syscalls.get_child_subreaper()
    syscalls.set_child_subreaper(True)
    reaper = Reaper()
    reaper.install(asyncio.get_running_loop())
    h = Harness(reaper, tmp_path / "runc-root", tmp_path)
    unsubscribe = reaper.subscribe(h.on_exit)
    try:
        yield h
    finally:
        for runc, cid in h.containers:
            with contextlib.suppress(RuntimeFailure, TimeoutError):
                await asyncio.wait_for(runc.delete(cid, force=True), TIMEOUT)
        for target in h.mounts:
            with contextlib.suppress(OSError):
                unmount_all(str(target))
        # Give re-parented container processes a moment to be collected.
        await asyncio.sleep(0.1)
        unsubscribe()
        reaper.uninstall()
        syscalls.set_child_subreaper(was_subreaper)
        for path in glob.glob(f"/sys/fs/cgroup/*/{_CGROUP_PARENT}"):
            with contextlib.suppress(OSError):
                os.rmdir(path)


def _read_available(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            out += chunk
    return out


@pytest.mark.parametrize(("script", "expected"), [("exit 0", 0), ("exit 3", 3)])
async def test_create_start_and_exit_status(harness: Harness, script: str, expected: int) -> None:
    cid = f"exit{expected}"
    runc = harness.bundle(cid, ["sh", "-c", f"echo hello from $$; {script}"])
    out_r, out_w = os.pipe()
    try:
        pid = await harness.create(runc, cid, stdout=out_w)
        os.close(out_w)
        out_w = -1
        state = await runc.state(cid)
        assert state["status"] == "created" and state["pid"] == pid
        await runc.start(cid)
        assert await harness.exit_of(pid) == expected
        # Its own pid namespace: the init is pid 1 inside.
        assert _read_available(out_r) == b"hello from 1\n"
        assert (await runc.state(cid))["status"] == "stopped"
        await runc.delete(cid)
        with pytest.raises(RuntimeFailure):
            await runc.state(cid)
    finally:
        os.close(out_r)
        if out_w >= 0:
            os.close(out_w)


async def test_start_without_runc_is_what_runc_start_leaves(harness: Harness) -> None:
    """Runc.start reads the exec fifo itself: runc sees the same running container."""
    runc = harness.bundle("direct", ["sleep", "1000"])
    pid = await harness.create(runc, "direct")
    fifo = harness.root / NAMESPACE / "direct" / "exec.fifo"
    assert fifo.exists()
    await runc.start("direct")
    assert not fifo.exists()
    state = await runc.state("direct")
    assert state["status"] == "running" and state["pid"] == pid
    # runc init execs the command once the fifo is read, as after `runc start`: a moment
    # later on a busy machine (a loaded CI run saw runc init's own name still there).
    deadline = asyncio.get_running_loop().time() + 20
    while (argv0 := Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]) != b"sleep":
        assert asyncio.get_running_loop().time() < deadline, argv0
        await asyncio.sleep(0.01)
    with pytest.raises(RuntimeFailure, match="cannot start an already running container"):
        await runc._run(["start", "direct"], from_log=True)
    await runc.kill("direct", signal.SIGKILL)
    assert await harness.exit_of(pid) == 137
    await runc.delete("direct")


async def test_kill_9_is_137_and_ps(harness: Harness) -> None:
    runc = harness.bundle("killed", ["sleep", "1000"])
    pid = await harness.create(runc, "killed")
    await runc.start("killed")
    assert await runc.ps("killed") == [pid]
    await runc.kill("killed", signal.SIGKILL)
    assert await harness.exit_of(pid) == 137
    assert await runc.ps("killed") == []
    await runc.delete("killed")


async def test_pause_resume_and_kill_all(harness: Harness) -> None:
    runc = harness.bundle("family", ["sh", "-c", "sleep 1000 & sleep 1000 & wait"])
    pid = await harness.create(runc, "family")
    await runc.start("family")
    for _ in range(100):
        pids = await runc.ps("family")
        if len(pids) == 3:
            break
        await asyncio.sleep(0.05)
    assert pid in pids and len(pids) == 3
    await runc.pause("family")
    assert (await runc.state("family"))["status"] == "paused"
    with pytest.raises(RuntimeFailure):
        await runc.pause("family")
    await runc.resume("family")
    assert (await runc.state("family"))["status"] == "running"
    await runc.kill("family", signal.SIGKILL, all=True)
    assert await harness.exit_of(pid) == 137
    # The other two are reaped inside the dying pid namespace, never by us: just gone.
    others = [p for p in pids if p != pid]
    for _ in range(100):
        if not any(Path(f"/proc/{p}").exists() for p in others):
            break
        await asyncio.sleep(0.05)
    assert not any(Path(f"/proc/{p}").exists() for p in others)
    assert await runc.ps("family") == []
    await runc.delete("family")


async def test_delete_force_of_a_running_container(harness: Harness) -> None:
    runc = harness.bundle("forced", ["sleep", "1000"])
    pid = await harness.create(runc, "forced")
    await runc.start("forced")
    with pytest.raises(RuntimeFailure):
        await runc.delete("forced")  # still running: refused without --force
    await runc.delete("forced", force=True)
    assert await harness.exit_of(pid) == 137
    with pytest.raises(RuntimeFailure):
        await runc.state("forced")


async def test_failures_carry_the_log_json_error(harness: Harness) -> None:
    runc = harness.bundle("twice", ["sleep", "1000"])
    await harness.create(runc, "twice")
    with pytest.raises(RuntimeFailure) as info:
        await harness.create(runc, "twice")
    assert "already exists" in info.value.message
    assert "did not terminate successfully" not in info.value.message

    bad = harness.bundle("badexec", ["/no/such/binary"])
    with pytest.raises(RuntimeFailure) as info:
        await harness.create(bad, "badexec")
    assert "/no/such/binary" in info.value.message
    assert "no such file or directory" in info.value.message
    assert info.value.status == 1


async def test_mounted_rootfs_and_unmount_all(harness: Harness) -> None:
    source = build_busybox_rootfs(harness.tmp / "image")
    rootfs = harness.tmp / "mounted" / "rootfs"
    rootfs.mkdir(parents=True)
    harness.mounts.append(rootfs)
    mounts = [
        mount_pb2.Mount(type="tmpfs", source="tmpfs", options=["size=1m"]),
        mount_pb2.Mount(type="bind", source=str(source), options=["rbind", "rw"]),
    ]
    mount_all(mounts, str(rootfs))
    assert (rootfs / "bin" / "busybox").exists()
    runc = harness.bundle("mounted", ["cat", "/etc/group"], rootfs=rootfs)
    out_r, out_w = os.pipe()
    try:
        pid = await harness.create(runc, "mounted", stdout=out_w)
        os.close(out_w)
        out_w = -1
        await runc.start("mounted")
        assert await harness.exit_of(pid) == 0
        assert _read_available(out_r) == (source / "etc" / "group").read_bytes()
    finally:
        os.close(out_r)
        if out_w >= 0:
            os.close(out_w)
    await runc.delete("mounted")
    unmount_all(str(rootfs))
    target = os.path.realpath(rootfs)
    with open("/proc/self/mountinfo") as f:
        assert not [line for line in f if line.split()[4] == target]
    assert list(rootfs.iterdir()) == []
