"""Checkpoint and Create-from-checkpoint: runc flags, state rules, events and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import any_pb2

from protocol.proto import anyutil
from protocol.proto.events import task_pb2 as events_pb2
from protocol.proto.runc import options_pb2
from protocol.proto.runctypes import runc_pb2
from protocol.proto.task.v2 import shim_pb2
from protocol.proto.types import task_pb2 as types_pb2
from protocol.ttrpc.status import Code, TtrpcError
from shim.task.checkpoint import (
    CheckpointConfig,
    RestoreConfig,
    checkpoint_args,
    decode_checkpoint_request,
    restore_args,
)
from shim.task.container import container_record_path
from tests.unit.shim.task.test_service import Harness, expect_error, make_harness, settle

# ----------------------------------------------------------------------------- flags


def test_checkpoint_args_default_leaves_running() -> None:
    config = CheckpointConfig(path="/img")
    assert checkpoint_args(config, "/b/work/criu-work") == [
        "--image-path", "/img", "--work-path", "/b/work/criu-work", "--leave-running",
    ]  # fmt: skip


def test_checkpoint_args_every_option_in_go_runc_order() -> None:
    config = CheckpointConfig(
        path="/img",
        exit=True,
        open_tcp=True,
        external_unix_sockets=True,
        terminal=True,
        file_locks=True,
        empty_namespaces=("network", "ipc"),
        work_path="/w",
        parent_path="/parent",
    )
    assert checkpoint_args(config, "/w") == [
        "--image-path", "/img", "--work-path", "/w", "--parent-path", "/parent",
        "--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks",
        "--empty-ns", "network", "--empty-ns", "ipc",
    ]  # fmt: skip


def _request(path: str = "/img", **options: object) -> shim_pb2.CheckpointTaskRequest:
    req = shim_pb2.CheckpointTaskRequest(id="c1", path=path)
    if options:
        req.options.CopyFrom(anyutil.pack(options_pb2.CheckpointOptions(**options)))  # type: ignore[arg-type]
    return req


def test_decode_maps_every_checkpoint_option() -> None:
    config = decode_checkpoint_request(
        _request(
            exit=True,
            open_tcp=True,
            external_unix_sockets=True,
            terminal=True,
            file_locks=True,
            empty_namespaces=["network"],
            cgroups_mode="soft",
            image_path="/elsewhere",
            work_path="/w",
            parent_path="/p",
        )
    )
    # cgroups_mode and image_path reach no runc flag, as with the Go shim.
    assert config == CheckpointConfig(
        path="/img",
        exit=True,
        open_tcp=True,
        external_unix_sockets=True,
        terminal=True,
        file_locks=True,
        empty_namespaces=("network",),
        work_path="/w",
        parent_path="/p",
    )
    assert decode_checkpoint_request(_request()) == CheckpointConfig(path="/img")


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (_request(""), "checkpoint: image path '': must be an absolute path"),
        (_request("rel/img"), "checkpoint: image path 'rel/img': must be an absolute path"),
        (_request(work_path="w"), "checkpoint: work path 'w': must be an absolute path"),
        (_request(parent_path="p"), "checkpoint: parent path 'p': must be an absolute path"),
        (_request("/a\0b"), "checkpoint: image path '/a\\x00b': contains a NUL byte"),
    ],
)
def test_decode_refuses_bad_paths(req: shim_pb2.CheckpointTaskRequest, message: str) -> None:
    with pytest.raises(TtrpcError) as info:
        decode_checkpoint_request(req)
    assert (info.value.code, info.value.message) == (Code.INVALID_ARGUMENT, message)


def test_decode_refuses_other_option_types() -> None:
    req = shim_pb2.CheckpointTaskRequest(id="c1", path="/img")
    req.options.CopyFrom(anyutil.pack(options_pb2.Options()))
    with pytest.raises(TtrpcError) as info:
        decode_checkpoint_request(req)
    assert info.value.code == Code.INVALID_ARGUMENT
    assert "not containerd.runc.v1.CheckpointOptions" in info.value.message
    garbage = shim_pb2.CheckpointTaskRequest(id="c1", path="/img")
    garbage.options.CopyFrom(
        any_pb2.Any(type_url="containerd.runc.v1.CheckpointOptions", value=b"\xff")
    )
    with pytest.raises(TtrpcError) as info:
        decode_checkpoint_request(garbage)
    assert info.value.code == Code.INVALID_ARGUMENT


def test_restore_args_in_go_runc_order() -> None:
    config = RestoreConfig(
        image_path="/cp", work_path="/b/work", parent_path="", pid_file="/b/init.pid",
        no_pivot=False,
    )  # fmt: skip
    assert restore_args(config, console_socket=None, bundle="/b") == [
        "--image-path", "/cp", "--work-path", "/b/work", "--detach",
        "--pid-file", "/b/init.pid", "-no-subreaper", "--bundle", "/b",
    ]  # fmt: skip
    full = RestoreConfig(
        image_path="/cp", work_path="/w", parent_path="/pcp", pid_file="/b/init.pid",
        no_pivot=True,
    )  # fmt: skip
    assert restore_args(full, console_socket="/tmp/s.sock", bundle="/b") == [
        "--image-path", "/cp", "--work-path", "/w", "--parent-path", "/pcp", "--detach",
        "--pid-file", "/b/init.pid", "--console-socket", "/tmp/s.sock", "--no-pivot",
        "-no-subreaper", "--bundle", "/b",
    ]  # fmt: skip


# ----------------------------------------------------------------------------- checkpoint


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return make_harness(tmp_path)


async def test_checkpoint_running_leaves_it_running_and_publishes(h: Harness) -> None:
    bundle = h.bundle()
    await h.run(bundle=bundle)
    work = Path(bundle, "work", "criu-work")

    def runc_made_work() -> None:
        work.mkdir(parents=True)
        (work / "dump.log").write_text("ok\n")

    h.shared.hooks["checkpoint"] = runc_made_work
    await h.service.checkpoint(_request("/img"))
    assert h.shared.calls[-1] == (
        "checkpoint", "c1",
        ["--image-path", "/img", "--work-path", str(work), "--leave-running"],
    )  # fmt: skip
    # The default work dir is the shim's scratch: gone afterwards.
    assert not work.exists()
    topic, event = h.publisher.events[-1]
    assert topic == "/tasks/checkpointed"
    assert event == events_pb2.TaskCheckpointed(container_id="c1", checkpoint="/img")
    assert (await h.state()).status == types_pb2.RUNNING


async def test_checkpoint_with_exit_stops_the_init_like_any_exit(h: Harness) -> None:
    pid = await h.run()
    await h.service.pause(shim_pb2.PauseRequest(id="c1"))
    # runc returns once CRIU killed the (paused) container; the exit arrives after.
    await h.service.checkpoint(_request("/img", exit=True, work_path="/keep"))
    assert h.shared.calls[-1] == (
        "checkpoint", "c1", ["--image-path", "/img", "--work-path", "/keep"],
    )  # fmt: skip
    h.reaper.exit(pid, 137)
    await h.service.wait(shim_pb2.WaitRequest(id="c1"))
    state = await h.state()
    assert (state.status, state.exit_status) == (types_pb2.STOPPED, 137)
    topics = h.publisher.topics()
    assert topics.index("/tasks/checkpointed") < topics.index("/tasks/exit")
    # A paused init's exit resumes the cgroup, as for any paused exit.
    assert ("resume", "c1") in h.shared.calls
    await h.service.delete(shim_pb2.DeleteRequest(id="c1"))


async def test_checkpoint_state_errors(h: Harness) -> None:
    await expect_error(
        h.service.checkpoint(_request()), Code.NOT_FOUND, "container not created: not found"
    )
    pid = await h.create()
    await expect_error(
        h.service.checkpoint(_request()), Code.UNKNOWN, "cannot checkpoint a task in created state"
    )
    await h.service.start(shim_pb2.StartRequest(id="c1"))
    h.reaper.exit(pid, 0)
    await h.service.wait(shim_pb2.WaitRequest(id="c1"))
    await expect_error(
        h.service.checkpoint(_request()), Code.UNKNOWN, "cannot checkpoint a stopped container"
    )
    assert "checkpoint" not in h.shared.names()


async def test_checkpoint_failure_keeps_criu_log_and_names_it(h: Harness) -> None:
    bundle = h.bundle()
    await h.run(bundle=bundle)
    work = Path(bundle, "work", "criu-work")

    def criu_failed() -> None:
        work.mkdir(parents=True)
        (work / "dump.log").write_text("Error (criu/cr-dump.c:1): NOTIFY failed\n")

    h.shared.hooks["checkpoint"] = criu_failed
    h.shared.failures["checkpoint"] = (
        "runc did not terminate successfully: exit status 1: criu failed: type DUMP errno 0\n"
        "log file: /x/dump.log"
    )
    kept = Path(bundle, "criu-dump.log")
    await expect_error(
        h.service.checkpoint(_request()),
        Code.UNKNOWN,
        "runc did not terminate successfully: exit status 1: criu failed: type DUMP errno 0"
        f" path= {kept}",
    )
    assert kept.read_text() == "Error (criu/cr-dump.c:1): NOTIFY failed\n"
    assert not work.exists()
    assert "/tasks/checkpointed" not in h.publisher.topics()
    assert (await h.state()).status == types_pb2.RUNNING


async def test_checkpoint_failure_without_a_log_still_names_the_path(h: Harness) -> None:
    bundle = h.bundle()
    await h.run(bundle=bundle)
    h.shared.failures["checkpoint"] = "exec: 'runc': No such file or directory"
    await expect_error(
        h.service.checkpoint(_request(work_path=str(Path(bundle, "w")))),
        Code.UNKNOWN,
        f"exec: 'runc': No such file or directory path= {bundle}/criu-dump.log",
    )


# ----------------------------------------------------------------------------- restore


def _checkpoint_dir(h: Harness, name: str = "cp") -> str:
    path = h.tmp / name
    path.mkdir(exist_ok=True)
    return str(path)


async def test_create_from_checkpoint_waits_for_start_to_restore(h: Harness) -> None:
    bundle, cp = h.bundle(), _checkpoint_dir(h)
    pid = await h.create(bundle=bundle, checkpoint=cp, stdout="/fifo/out")
    assert pid == 0
    assert h.shared.calls == []
    topic, event = h.publisher.events[-1]
    assert topic == "/tasks/create"
    assert isinstance(event, events_pb2.TaskCreate)
    assert (event.checkpoint, event.pid, event.io.stdout) == (cp, 0, "/fifo/out")
    # The IO is opened at Create, as for any create.
    assert [io.process_id for io in h.shared.ios] == ["c1"]
    state = await h.state()
    assert (state.status, state.pid) == (types_pb2.CREATED, 0)
    # Nothing runs yet: the Go shim's "created (checkpoint)" refusals.
    await expect_error(
        h.service.pause(shim_pb2.PauseRequest(id="c1")),
        Code.UNKNOWN,
        "cannot pause task in created state",
    )
    await expect_error(
        h.service.checkpoint(_request()), Code.UNKNOWN, "cannot checkpoint a task in created state"
    )

    restored = (await h.service.start(shim_pb2.StartRequest(id="c1"))).pid
    assert restored == 1000
    assert h.shared.calls[-1] == (
        "restore", "c1",
        ["--image-path", cp, "--work-path", f"{bundle}/work", "--detach",
         "--pid-file", f"{bundle}/init.pid", "-no-subreaper", "--bundle", bundle],
    )  # fmt: skip
    assert h.publisher.events[-1] == (
        "/tasks/start",
        events_pb2.TaskStart(container_id="c1", pid=1000),
    )
    state = await h.state()
    assert (state.status, state.pid) == (types_pb2.RUNNING, 1000)
    # The record a restarted shim reads names the restored pid.
    assert '"pid":1000' in container_record_path(bundle).read_text()

    # From here on the restored init is any init.
    await h.service.kill(shim_pb2.KillRequest(id="c1", signal=15))
    assert h.shared.names()[-1] == "kill" and ("kill", "c1", 15, False) in h.shared.calls
    h.reaper.exit(1000, 143)
    await h.service.wait(shim_pb2.WaitRequest(id="c1"))
    assert (await h.state()).exit_status == 143
    assert h.publisher.topics()[-1] == "/tasks/exit"
    await h.service.delete(shim_pb2.DeleteRequest(id="c1"))
    assert h.shared.ios[0].closed


async def test_exec_is_refused_before_the_restore_and_allowed_after(h: Harness) -> None:
    await h.create(checkpoint=_checkpoint_dir(h))
    spec = any_pb2.Any(type_url="x", value=b'{"args": ["sh"], "cwd": "/"}')
    await expect_error(
        h.service.exec(shim_pb2.ExecProcessRequest(id="c1", exec_id="e1", spec=spec)),
        Code.UNKNOWN,
        "cannot exec in a created state",
    )
    await h.service.start(shim_pb2.StartRequest(id="c1"))
    await h.exec()
    exec_pid = (await h.service.start(shim_pb2.StartRequest(id="c1", exec_id="e1"))).pid
    assert exec_pid == 1001
    assert h.shared.names()[-1] == "exec"


async def test_restore_options_criu_work_path_parent_and_no_pivot(h: Harness) -> None:
    bundle, cp, parent = h.bundle(), _checkpoint_dir(h), _checkpoint_dir(h, "parent")
    options = anyutil.pack(options_pb2.Options(criu_work_path="/criu/w", no_pivot_root=True))
    await h.create(bundle=bundle, checkpoint=cp, parent_checkpoint=parent, options=options)
    await h.service.start(shim_pb2.StartRequest(id="c1"))
    assert h.shared.calls[-1] == (
        "restore", "c1",
        ["--image-path", cp, "--work-path", "/criu/w", "--parent-path", parent, "--detach",
         "--pid-file", f"{bundle}/init.pid", "--no-pivot", "-no-subreaper",
         "--bundle", bundle],
    )  # fmt: skip


async def test_legacy_create_options_give_the_restore_work_path(h: Harness) -> None:
    bundle, cp = h.bundle(), _checkpoint_dir(h)
    options = anyutil.pack(runc_pb2.CreateOptions(criu_work_path="/legacy/w"))
    await h.create(bundle=bundle, checkpoint=cp, options=options)
    await h.service.start(shim_pb2.StartRequest(id="c1"))
    args = h.shared.calls[-1][2]
    assert args[args.index("--work-path") + 1] == "/legacy/w"


async def test_create_refuses_a_checkpoint_that_is_no_directory(h: Harness) -> None:
    bundle = h.bundle()
    await expect_error(
        h.create(bundle=bundle, checkpoint=str(h.tmp / "missing")),
        Code.INVALID_ARGUMENT,
        f"checkpoint {h.tmp}/missing: not a directory",
    )
    await expect_error(
        h.create(bundle=bundle, checkpoint="relative"),
        Code.INVALID_ARGUMENT,
        "checkpoint 'relative': must be an absolute path",
    )
    await expect_error(
        h.create(bundle=bundle, checkpoint=_checkpoint_dir(h), parent_checkpoint="/nope/x"),
        Code.INVALID_ARGUMENT,
        "parent checkpoint /nope/x: not a directory",
    )
    assert h.shared.ios == [] and h.shared.calls == []
    assert sorted(p.name for p in Path(bundle).iterdir()) == ["config.json"]


async def test_restore_failure_reports_runc_and_leaves_a_deletable_task(h: Harness) -> None:
    await h.create(checkpoint=_checkpoint_dir(h))
    h.shared.failures["restore"] = "criu failed: type RESTORE errno 0"
    await expect_error(
        h.service.start(shim_pb2.StartRequest(id="c1")),
        Code.UNKNOWN,
        "OCI runtime restore failed: criu failed: type RESTORE errno 0",
    )
    state = await h.state()
    assert (state.status, state.pid) == (types_pb2.CREATED, 0)
    assert "/tasks/start" not in h.publisher.topics()
    h.shared.failures["delete"] = "container does not exist"
    await h.service.delete(shim_pb2.DeleteRequest(id="c1"))
    assert h.shared.ios[0].closed
    assert h.publisher.topics()[-1] == "/tasks/delete"


async def test_an_exit_during_the_restore_follows_the_start_event(h: Harness) -> None:
    await h.create(checkpoint=_checkpoint_dir(h))
    # The restored init dies before runc has even returned.
    h.shared.hooks["restore"] = lambda: h.reaper.exit(1000, 3)
    await h.service.start(shim_pb2.StartRequest(id="c1"))
    await h.service.wait(shim_pb2.WaitRequest(id="c1"))
    topics = h.publisher.topics()
    assert topics[-2:] == ["/tasks/start", "/tasks/exit"], topics
    state = await h.state()
    assert (state.status, state.exit_status, state.pid) == (types_pb2.STOPPED, 3, 1000)


async def test_a_restarted_shim_finds_a_restored_init_through_runc(tmp_path: Path) -> None:
    first = make_harness(tmp_path)
    bundle = first.bundle()
    await first.create(bundle=bundle, checkpoint=_checkpoint_dir(first))
    # The shim died during the restore: its record still says pid 0.
    assert '"pid":0' in container_record_path(bundle).read_text()
    second = make_harness(tmp_path)
    second.shared.runc_state = {"status": "running", "pid": 4321}
    assert await second.service.recover(bundle)
    state = await second.state()
    assert (state.status, state.pid) == (types_pb2.RUNNING, 4321)
    second.reaper.exit(4321, 0)
    await settle()
    assert (await second.state()).status == types_pb2.STOPPED


async def test_a_restarted_shim_with_nothing_restored_reports_it_stopped(tmp_path: Path) -> None:
    first = make_harness(tmp_path)
    bundle = first.bundle()
    await first.create(bundle=bundle, checkpoint=_checkpoint_dir(first))
    second = make_harness(tmp_path)
    second.shared.failures["state"] = "container does not exist"
    assert await second.service.recover(bundle)
    state = await second.state()
    assert (state.status, state.exit_status) == (types_pb2.STOPPED, 255)
