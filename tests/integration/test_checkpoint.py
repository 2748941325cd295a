"""Checkpoint and restore, pyshim beside containerd 2.3's Go shim, on this host.

CRIU cannot dump on this host's kernel, so both shims get the same recording stand-in
for runc (tests/support/recording_runc.py: runtime option BinaryName) that fakes
checkpoint and restore and hands everything else to the real runc. The same requests go
through containerd to both shims; the runc command lines they produce must be the same
(ids and bundle paths aside), and so must what follows: the exit a checkpoint with
`exit` causes, the error and CRIU log of a failed one, and the restored init's life
(start, exec, kill, exit). The real CRIU runs in the VM tier (tests/guest/).
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from crashtest.images import build_busybox_rootfs
from protocol import wire
from protocol.proto import anyutil
from protocol.proto.runc import options_pb2
from tests.integration.test_stats_oom import GO_SHIM, PYSHIM, Events, task_status, wait_until
from tests.support.containerd import Containerd
from tests.support.recording_runc import DUMP_LOG, RecordingRunc, install

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("containerd", ["2.3"], indirect=True),
]

SHIMS = {"py": PYSHIM, "go": GO_SHIM}


@pytest.fixture
def runc(tmp_path: Path) -> RecordingRunc:
    return install(tmp_path / "standin")


def _runtime_flags(kind: str, runc: RecordingRunc) -> list[str]:
    """How ctr gives each shim its runc: the Go shim's own flag, pyshim's TOML options."""
    if kind == "go":
        return ["--runtime", GO_SHIM, "--runc-binary", str(runc.path)]
    config = runc.dir / "pyshim-options.toml"
    config.write_text(f'BinaryName = "{runc.path}"\n')
    return ["--runtime", PYSHIM, "--runtime-config-path", str(config)]


def _normalized(argv: list[str], ctrd: Containerd, cid: str) -> list[str]:
    bundle = str(ctrd.bundle(cid))
    return [
        "ID" if a == cid else a.replace(bundle, "BUNDLE").replace(ctrd.namespace, "NS")
        for a in argv[1:]
    ]


def _checkpoint(
    ctrd: Containerd, cid: str, opts: options_pb2.CheckpointOptions, timeout: float = 60.0
) -> None:
    """containerd's Tasks.Checkpoint with runc CheckpointOptions (what ctr cannot set).
    With an image_path containerd only passes it on as the request's path."""
    request = wire.field_str(1, cid) + wire.field_bytes(3, anyutil.pack(opts).SerializeToString())
    ctrd.tasks_call("Checkpoint", request, timeout=timeout)


def _run(ctrd: Containerd, image: str, runc: RecordingRunc, kind: str, cid: str) -> None:
    ctrd.ctr("run", "-d", *_runtime_flags(kind, runc), image, cid, "sleep", "300")
    wait_until(f"{cid} running", lambda: task_status(ctrd, cid) == "RUNNING")


def _wait_stopped(ctrd: Containerd, cid: str) -> None:
    wait_until(f"{cid} stopped", lambda: task_status(ctrd, cid) == "STOPPED")


def _stop(ctrd: Containerd, cid: str) -> None:
    if task_status(ctrd, cid) != "STOPPED":
        ctrd.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
        _wait_stopped(ctrd, cid)
    ctrd.ctr("task", "delete", cid)
    ctrd.ctr("container", "rm", cid)


def _exit_status(ctrd: Containerd, cid: str) -> int:
    """The task's recorded exit status (`ctr task ls` does not show it)."""
    response = ctrd.tasks_call("Get", wire.field_str(1, cid))
    process = next(v for n, _, v in wire.iter_fields(response) if n == 1)
    assert isinstance(process, bytes)
    fields = {n: v for n, _, v in wire.iter_fields(process)}
    status = fields.get(9, 0)  # containerd.v1.types.Process.exit_status
    assert isinstance(status, int)
    return status


def test_checkpoint_command_lines_match_the_go_shim(
    containerd: Containerd, busybox_image: str, runc: RecordingRunc, tmp_path: Path
) -> None:
    image, work = tmp_path / "image", tmp_path / "work"
    every_option = options_pb2.CheckpointOptions(
        open_tcp=True,
        external_unix_sockets=True,
        terminal=True,
        file_locks=True,
        empty_namespaces=["network", "ipc"],
        cgroups_mode="soft",
        image_path=str(image),
        work_path=str(work),
    )
    lines: dict[str, list[list[str]]] = {}
    for kind in SHIMS:
        cid = f"ck-{kind}"
        _run(containerd, busybox_image, runc, kind, cid)
        before = len(runc.commands("checkpoint"))
        # ctr pauses the task around the checkpoint; the default work dir goes after.
        containerd.ctr("task", "checkpoint", "--image-path", str(image), cid)
        _checkpoint(containerd, cid, every_option)
        assert task_status(containerd, cid) == "RUNNING"
        assert not (containerd.bundle(cid) / "work" / "criu-work").exists()
        lines[kind] = [
            _normalized(c, containerd, cid) for c in runc.commands("checkpoint")[before:]
        ]
        _stop(containerd, cid)
    assert lines["py"] == lines["go"]
    root = ["--root", "/run/containerd/runc/NS", "--log", "BUNDLE/log.json", "--log-format",
            "json"]  # fmt: skip
    assert lines["py"] == [
        [*root, "checkpoint", "--image-path", str(image), "--work-path",
         "BUNDLE/work/criu-work", "--leave-running", "ID"],
        [*root, "checkpoint", "--image-path", str(image), "--work-path", str(work),
         "--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks",
         "--empty-ns", "network", "--empty-ns", "ipc", "--leave-running", "ID"],
    ]  # fmt: skip


def test_checkpoint_with_exit_stops_the_task_like_the_go_shim(
    containerd: Containerd, busybox_image: str, runc: RecordingRunc, tmp_path: Path
) -> None:
    image = tmp_path / "image"
    events = Events(containerd)
    try:
        for kind in SHIMS:
            cid = f"ex-{kind}"
            _run(containerd, busybox_image, runc, kind, cid)
            containerd.ctr("task", "checkpoint", "--exit", "--image-path", str(image), cid)
            _wait_stopped(containerd, cid)
            # The stand-in killed it as CRIU does: the exit is recorded as any other.
            assert _exit_status(containerd, cid) == 137
            events.wait_topic(cid, "/tasks/exit")
            _stop(containerd, cid)
        (last_py,) = [c for c in runc.commands("checkpoint") if "ex-py" in c]
        (last_go,) = [c for c in runc.commands("checkpoint") if "ex-go" in c]
        assert "--leave-running" not in last_py
        assert _normalized(last_py, containerd, "ex-py") == _normalized(
            last_go, containerd, "ex-go"
        )
        # pyshim also says so (the Go shim publishes nothing for a checkpoint).
        assert "/tasks/checkpointed" in events.topics("ex-py")
        assert "/tasks/checkpointed" not in events.topics("ex-go")
    finally:
        events.close()


def test_failed_checkpoint_error_and_criu_log_match_the_go_shim(
    containerd: Containerd, busybox_image: str, runc: RecordingRunc, tmp_path: Path
) -> None:
    runc.fail_checkpoints("criu failed: type DUMP errno 0\nlog file: /somewhere/dump.log\n")
    errors = {}
    for kind in SHIMS:
        cid = f"fl-{kind}"
        _run(containerd, busybox_image, runc, kind, cid)
        with pytest.raises(grpc.RpcError) as failed:
            _checkpoint(containerd, cid, options_pb2.CheckpointOptions(image_path=str(tmp_path)))
        assert failed.value.code() == grpc.StatusCode.UNKNOWN
        bundle = str(containerd.bundle(cid))
        errors[kind] = str(failed.value.details()).replace(bundle, "BUNDLE")
        assert (containerd.bundle(cid) / "criu-dump.log").read_text() == DUMP_LOG
        assert task_status(containerd, cid) == "RUNNING"
        _stop(containerd, cid)
    assert errors["py"] == errors["go"]
    assert errors["py"].endswith(
        "did not terminate successfully: exit status 1: criu failed: type DUMP errno 0"
        " path= BUNDLE/criu-dump.log"
    ), errors


def _create_from_checkpoint(ctrd: Containerd, cid: str, image: Path, runc: RecordingRunc) -> int:
    """Tasks.Create from a checkpoint directory (runc Options.criu_image_path), as
    containerd's Go client does with WithRestoreImagePath; the restore waits for Start."""
    options = options_pb2.Options(binary_name=str(runc.path), criu_image_path=str(image))
    response = ctrd.tasks_call(
        "Create",
        wire.field_str(1, cid) + wire.field_bytes(9, anyutil.pack(options).SerializeToString()),
    )
    pid = next((v for n, _, v in wire.iter_fields(response) if n == 2), 0)
    assert isinstance(pid, int)
    return pid


def test_restore_command_lines_and_restored_init_match_the_go_shim(
    containerd: Containerd, runc: RecordingRunc, tmp_path: Path
) -> None:
    image = tmp_path / "image"
    image.mkdir()
    rootfs = build_busybox_rootfs(tmp_path / "rootfs")
    lines = {}
    for kind in SHIMS:
        cid = f"rs-{kind}"
        # A rootfs of its own (Tasks.Create is sent no snapshot mounts here).
        containerd.ctr("container", "create", *_runtime_flags(kind, runc), "--rootfs",
                       str(rootfs), cid, "/bin/sleep", "300")  # fmt: skip
        assert _create_from_checkpoint(containerd, cid, image, runc) == 0
        assert task_status(containerd, cid) == "CREATED"
        assert runc.commands("restore") == [] or all(cid not in c for c in runc.commands("restore"))
        started = containerd.tasks_call("Start", wire.field_str(1, cid))
        pid = next(v for n, _, v in wire.iter_fields(started) if n == 1)
        assert isinstance(pid, int) and pid > 0
        assert task_status(containerd, cid) == "RUNNING"
        # The restored init is any init: exec into it, kill it, its exit is recorded.
        out = containerd.ctr("task", "exec", "--exec-id", "e1", cid, "/bin/echo", "inside")
        assert out.stdout.strip() == "inside"
        containerd.ctr("task", "kill", "-s", "SIGKILL", cid)
        _wait_stopped(containerd, cid)
        assert _exit_status(containerd, cid) == 137
        (restore,) = [c for c in runc.commands("restore") if cid in c]
        lines[kind] = _normalized(restore, containerd, cid)
        _stop(containerd, cid)
    assert lines["py"] == lines["go"]
    assert lines["py"] == [
        "--root", "/run/containerd/runc/NS", "--log", "BUNDLE/log.json", "--log-format", "json",
        "restore", "--image-path", str(image), "--work-path", "BUNDLE/work", "--detach",
        "--pid-file", "BUNDLE/init.pid", "-no-subreaper", "--bundle", "BUNDLE", "ID",
    ]  # fmt: skip


def test_checkpoint_errors_before_runc(
    containerd: Containerd, runc: RecordingRunc, tmp_path: Path
) -> None:
    """Checkpoint of a task that is not running, and bad requests, never reach runc."""
    cid = "bad-py"
    rootfs = build_busybox_rootfs(tmp_path / "rootfs")
    containerd.ctr("container", "create", *_runtime_flags("py", runc), "--rootfs", str(rootfs),
                   cid, "/bin/sleep", "300")  # fmt: skip
    containerd.tasks_call(
        "Create",
        wire.field_str(1, cid)
        + wire.field_bytes(
            9, anyutil.pack(options_pb2.Options(binary_name=str(runc.path))).SerializeToString()
        ),
    )
    with pytest.raises(grpc.RpcError) as created:
        _checkpoint(containerd, cid, options_pb2.CheckpointOptions(image_path="/tmp/x"))
    assert "cannot checkpoint a task in created state" in str(created.value.details())
    containerd.tasks_call("Start", wire.field_str(1, cid))
    with pytest.raises(grpc.RpcError) as relative:
        _checkpoint(
            containerd, cid, options_pb2.CheckpointOptions(image_path="/tmp/x", work_path="w")
        )
    assert relative.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "work path 'w': must be an absolute path" in str(relative.value.details())
    assert runc.commands("checkpoint") == []
    _stop(containerd, cid)
