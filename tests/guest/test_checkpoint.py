"""Checkpoint and restore with the real CRIU, pyshim beside containerd's Go shim (issue 21).

Marked `criu`: only the suite's real kernel under qemu (`scripts/vm.sh test --tcg`) has
CHECKPOINT_RESTORE; the User-Mode Linux guest and this host do not, and vm.sh's UML
run leaves these tests out. The recorded command lines are compared on the host
(tests/integration/test_checkpoint.py); here CRIU really dumps and restores.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crashtest.images import build_busybox_rootfs
from protocol import wire
from protocol.proto import anyutil
from protocol.proto.cri.runtime.v1 import api_pb2 as cri
from protocol.proto.runc import options_pb2
from tests.integration.test_checkpoint import _checkpoint
from tests.integration.test_stats_oom import GO_SHIM, PYSHIM, task_status, wait_until
from tests.support.containerd import Containerd
from tests.support.cri import BUSYBOX_REF as CRI_BUSYBOX
from tests.support.cri import PYSHIM_AS_RUNC, CriNode, build_pause_archive
from tests.support.hosts import require
from tests.support.manager import Manager, manager_session

# containerd 2.3 (the share's, as for the tests marked for both hosts): ctr 1.7 sends
# CheckpointOptions (--exit, --image-path) only to runtimes named io.containerd.runc.*.
# Seen in the first TCG run: pyshim's dump worked, but without the options ctr was
# given. Neither ctr defines `run --checkpoint`: restores go through `container restore`.
pytestmark = [pytest.mark.integration, pytest.mark.criu]
CONTAINERD_2_3 = pytest.mark.parametrize("containerd", ["2.3"], indirect=True)

# Prints 0, 1, 2...: after a restore it must go on from where it was, not from 0.
COUNTER = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.5; done"
# CRIU under TCG is slow: a dump or restore can take many seconds.
SLOW = 300.0


@pytest.fixture(autouse=True)
def _slow_containerd(monkeypatch: pytest.MonkeyPatch) -> None:
    # containerd 2.3 took more than the default 120 s to serve in a TCG guest on a
    # loaded host (CRI's node, 2026-12-07).
    monkeypatch.setattr(Containerd, "start_timeout", SLOW)


def _values(log: Path) -> list[int]:
    if not log.exists():
        return []
    return [int(v) for v in log.read_text().split() if v.isdigit()]


def _wait_values(log: Path, count: int) -> list[int]:
    wait_until(f"{count} values in {log}", lambda: len(_values(log)) >= count, SLOW)
    return _values(log)


def _run_counter(ctrd: Containerd, image: str, runtime: str, cid: str, log: Path,
                 *flags: str) -> None:  # fmt: skip
    ctrd.ctr("run", "-d", "--runtime", runtime, "--log-uri", f"file://{log}", *flags, image,
             cid, "sh", "-c", COUNTER, timeout=SLOW)  # fmt: skip


def _remove(ctrd: Containerd, cid: str) -> None:
    ctrd.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
    wait_until(f"{cid} stopped", lambda: task_status(ctrd, cid) in ("STOPPED", "<missing>"))
    ctrd.ctr("task", "delete", cid, check=False)
    ctrd.ctr("container", "rm", cid, check=False)


# The same counter into a file of the container's own (`ctr container restore` gives
# the restored task ctr's stdio, which is gone once ctr returns).
FILE_COUNTER = "i=0; while true; do echo $i >> /count; i=$((i+1)); sleep 0.5; done"


def _counted(ctrd: Containerd, cid: str) -> list[int]:
    out = ctrd.ctr("task", "exec", "--exec-id", f"cat{time.monotonic_ns()}", cid, "cat",
                   "/count", check=False, timeout=SLOW)  # fmt: skip
    return [int(v) for v in out.stdout.split() if v.isdigit()]


@CONTAINERD_2_3
@pytest.mark.parametrize("runtime", [GO_SHIM, PYSHIM])
def test_ctr_checkpoint_and_restore_continue_the_counter(
    containerd: Containerd, busybox_image: str, runtime: str
) -> None:
    """`ctr container checkpoint --task --image --rw`, then `ctr container restore --live
    --rw` into a new container: the Go shim first (the reference must work here), then
    pyshim.

    Not `ctr task checkpoint`: containerd 2.x's client (task.go) annotates that index
    with `image.name` only, while restore (container_restore_opts.go) reads
    `org.opencontainers.image.ref.name` and the runtime and snapshotter labels that
    only container.Checkpoint writes ("image name not found in index"), and no ctr
    defines `run --checkpoint`. `container checkpoint` pauses the task, dumps it with
    `--leave-running` and resumes it (as CRI's CheckpointContainer does)."""
    containerd.ctr("run", "-d", "--runtime", runtime, busybox_image, "cnt", "sh", "-c",
                   FILE_COUNTER, timeout=SLOW)  # fmt: skip
    wait_until("3 values", lambda: len(_counted(containerd, "cnt")) >= 3, SLOW)
    ref = "checkpoint/cnt:1"
    done = containerd.ctr("container", "checkpoint", "--task", "--image", "--rw", "cnt", ref,
                          check=False, timeout=SLOW)  # fmt: skip
    assert done.returncode == 0, (done.stdout, done.stderr)
    # Left running (resumed) by ctr; the restore below must not share its cgroup.
    assert task_status(containerd, "cnt") == "RUNNING"
    _remove(containerd, "cnt")

    restored = containerd.ctr("container", "restore", "--live", "--rw", "again", ref,
                              check=False, timeout=SLOW)  # fmt: skip
    assert restored.returncode == 0, (restored.stdout, restored.stderr)
    assert task_status(containerd, "again") == "RUNNING"
    info = containerd.ctr("container", "info", "again").stdout
    assert runtime in info, info
    # The restored rw layer holds what was counted up to the dump; the restored process
    # goes on from there, not from 0 (exec into it works too: that is how it is read).
    before = _counted(containerd, "again")
    assert len(before) >= 3 and before == list(range(len(before))), before
    wait_until("more values", lambda: len(_counted(containerd, "again")) > len(before), SLOW)
    values = _counted(containerd, "again")
    assert values == list(range(len(values))), values
    _remove(containerd, "again")


@CONTAINERD_2_3
@pytest.mark.parametrize("runtime", [GO_SHIM, PYSHIM])
def test_checkpoint_of_a_paused_container(
    containerd: Containerd, busybox_image: str, runtime: str, tmp_path: Path
) -> None:
    """A paused container is checkpointed as it is and stays paused (ctr does not pause
    or resume it around the dump); resumed, it goes on."""
    log = tmp_path / "counter.log"
    _run_counter(containerd, busybox_image, runtime, "paused", log)
    _wait_values(log, 2)
    containerd.ctr("task", "pause", "paused")
    frozen = _values(log)
    image = tmp_path / "image"
    done = containerd.ctr("task", "checkpoint", "--image-path", str(image), "paused",
                          check=False, timeout=SLOW)  # fmt: skip
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert (image / "inventory.img").is_file()
    assert task_status(containerd, "paused") == "PAUSED"
    assert _values(log) == frozen
    containerd.ctr("task", "resume", "paused")
    _wait_values(log, len(frozen) + 2)
    _remove(containerd, "paused")


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[Manager]:
    # pyshimd took more than the default 30 s to serve in the first TCG run.
    monkeypatch.setattr(Manager, "start_timeout", SLOW)
    with manager_session() as m:
        yield m


def _logged(m: Manager, name: str) -> list[int]:
    return [int(v) for v in m.ok("logs", name).split() if v.isdigit()]


@pytest.mark.parametrize("tty", [False, True], ids=["pipes", "terminal"])
def test_pyshim_checkpoint_and_start_from_it(manager: Manager, tmp_path: Path, tty: bool) -> None:
    """pyshimd's CLI: checkpoint stops the container, start --checkpoint continues it in
    place; with a terminal too."""
    flags = ["-t"] if tty else []
    manager.ok("run", "-d", *flags, "--name", "cnt", "--network", "none", "--", "sh", "-c",
               COUNTER, timeout=SLOW)  # fmt: skip
    wait_until("3 values", lambda: len(_logged(manager, "cnt")) >= 3, SLOW)
    out = tmp_path / "checkpoint"
    res = manager.cli("checkpoint", "--output", str(out), "cnt", timeout=SLOW)
    assert res.returncode == 0, (res.stdout, res.stderr, manager.daemon_log()[-3000:])
    info = manager.inspect("cnt")
    assert (info["status"], info["exit_reason"]) == ("stopped", f"checkpointed to {out}")
    last = _logged(manager, "cnt")[-1]
    res = manager.cli("start", "--checkpoint", str(out), "cnt", timeout=SLOW)
    assert res.returncode == 0, (res.stdout, res.stderr, manager.daemon_log()[-3000:])
    wait_until("restored values", lambda: len(_logged(manager, "cnt")) >= last + 3, SLOW)
    values = _logged(manager, "cnt")
    # One log across both runs: the values go on from the checkpoint, never from 0.
    assert values[: last + 3] == list(range(last + 3)), values
    assert manager.inspect("cnt")["status"] == "running"
    manager.ok("rm", "-f", "cnt", timeout=SLOW)


@pytest.fixture
def cri_node(
    integration_env: None, busybox_archive: Path, containerd2_cache: Path, tmp_path: Path
) -> Iterator[CriNode]:
    """A CRI node on containerd 2.3: CheckpointContainer needs containerd >= 2.0."""
    pause = build_pause_archive(tmp_path / "pause-oci.tar")
    node = CriNode(busybox_archive=busybox_archive, pause_archive=pause,
                   host=require("2.3", containerd2_cache))  # fmt: skip
    assert node.client is not None
    node.client.timeout = SLOW
    try:
        yield node
    finally:
        node.close()
        leftovers = node.leftovers()
        assert not leftovers, leftovers


# The archive's members that containerd's CheckpointContainer writes (checkpointctl's
# names): CRIU's images, CRIU's statistics (from the work path), the container's spec,
# CRI's config and status, and its rw layer.
ARCHIVE_MEMBERS = {"checkpoint/inventory.img", "stats-dump", "spec.dump", "config.dump",
                   "status.dump", "rootfs-diff.tar"}  # fmt: skip


@pytest.mark.parametrize("handler", ["runc", PYSHIM_AS_RUNC])
def test_cri_checkpoint_container_writes_an_archive(
    cri_node: CriNode, handler: str, tmp_path: Path
) -> None:
    """Kubernetes' forensic checkpoint: the Go shim (handler runc), then pyshim's binary
    under the same runtime type (containerd passes CheckpointOptions to
    io.containerd.runc.v2 only; under io.containerd.pyshim.v1 CRIU's stats-dump would
    not be where containerd copies it from). The container keeps running."""
    c = cri_node.client
    assert c is not None
    pod_config = cri_node.pod_config("ckpt")
    pod = c.run_pod_sandbox(pod_config, runtime_handler=handler)
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="counter"),
        image=cri.ImageSpec(image=CRI_BUSYBOX),
        command=["sh", "-c", FILE_COUNTER],
        log_path="counter/0.log",
    )
    cid = c.create_container(pod, config, pod_config)
    c.start_container(cid)
    shims = set(cri_node.shim_binaries().values())
    want = "containerd-shim-runc-v2" if handler == "runc" else "containerd-shim-pyshim-v1"
    assert {os.path.basename(s) for s in shims} == {want}, shims

    def counted() -> list[int]:
        out = c.exec_sync(cid, ["cat", "/count"], timeout=int(SLOW)).stdout.decode()
        return [int(v) for v in out.split() if v.isdigit()]

    wait_until("3 values", lambda: len(counted()) >= 3, SLOW)
    archive = tmp_path / "checkpoint.tar"
    c.checkpoint_container(cid, str(archive), timeout=SLOW)
    with tarfile.open(archive) as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
        assert set(members) >= ARCHIVE_MEMBERS, sorted(members)
        config_dump = tar.extractfile(members["config.dump"])
        assert config_dump is not None
        assert json.load(config_dump)["id"] == cid
    # Left running (the forensic case), and still counting.
    assert c.container_status(cid).status.state == cri.CONTAINER_RUNNING
    before = len(counted())
    wait_until("more values", lambda: len(counted()) > before, SLOW)
    c.stop_pod_sandbox(pod)
    c.remove_pod_sandbox(pod)


def _ctr_on_a_terminal(ctrd: Containerd, *args: str) -> None:
    """ctr with a pty for its stdio: `ctr run -t` takes its console from there."""
    master, slave = os.openpty()
    try:
        res = subprocess.run(ctrd.ctr_argv(*args), stdin=slave, stdout=slave, stderr=slave,
                             env=ctrd.env(), timeout=SLOW, check=False)  # fmt: skip
    finally:
        os.close(slave)
        os.set_blocking(master, False)
        output = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(master, 65536):
                output += chunk
        os.close(master)
    assert res.returncode == 0, output.decode(errors="replace")


def _create_restored(ctrd: Containerd, cid: str, image: Path, stdout: Path) -> int:
    """Tasks.Create from a checkpoint directory (runc Options.criu_image_path), on a
    terminal whose output goes to the fifo ``stdout`` as ctr's do (the Go shim opens a
    restored terminal's stdout as a fifo whatever its scheme), then Tasks.Start (where
    runc restores). Returns the fifo's fd that keeps a reader there: the caller closes
    it once the task is gone."""
    options = options_pb2.Options(criu_image_path=str(image))
    os.mkfifo(stdout)
    reader = os.open(stdout, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ctrd.tasks_call(
            "Create",
            wire.field_str(1, cid)
            + wire.field_str(5, str(stdout))
            + wire.field_varint(7, 1)  # terminal
            + wire.field_bytes(9, anyutil.pack(options).SerializeToString()),
            timeout=SLOW,
        )
        ctrd.tasks_call("Start", wire.field_str(1, cid), timeout=SLOW)
    except BaseException:
        os.close(reader)
        raise
    return reader


@CONTAINERD_2_3
@pytest.mark.parametrize("runtime", [GO_SHIM, PYSHIM])
def test_checkpoint_and_restore_with_a_terminal(
    containerd: Containerd, runtime: str, tmp_path: Path
) -> None:
    """A `ctr run -t` task dumped with CheckpointOptions.terminal (runc's --shell-job; no
    ctr command sets it: Tasks.Checkpoint directly). Restored on a new terminal (runc
    hands CRIU's new pty master to the shim's console socket), the counter goes on.
    (Without `terminal` the Go shim's dump of such a task succeeded too in the guest.)"""
    rootfs = build_busybox_rootfs(tmp_path / "rootfs")
    count = rootfs / "count"
    _ctr_on_a_terminal(containerd, "run", "-d", "-t", "--runtime", runtime, "--env",
                       "PATH=/bin", "--rootfs", str(rootfs), "tty", "sh", "-c",
                       FILE_COUNTER)  # fmt: skip
    wait_until("3 values", lambda: len(_values(count)) >= 3, SLOW)

    image = tmp_path / "image"
    _checkpoint(containerd, "tty", options_pb2.CheckpointOptions(
        exit=True, terminal=True, image_path=str(image)), SLOW)  # fmt: skip
    assert (image / "inventory.img").is_file()
    wait_until("tty stopped", lambda: task_status(containerd, "tty") == "STOPPED", SLOW)
    frozen = _values(count)
    containerd.ctr("task", "delete", "tty")

    reader = _create_restored(containerd, "tty", image, tmp_path / "restored.out")
    try:
        assert task_status(containerd, "tty") == "RUNNING"
        wait_until("more values", lambda: len(_values(count)) > len(frozen) + 2, SLOW)
        values = _values(count)
        assert values == list(range(len(values))), values
        _remove(containerd, "tty")
    finally:
        os.close(reader)
