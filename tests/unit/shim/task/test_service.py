"""TaskService against a fake runtime, IO and publisher: lookups, create/delete, errors."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message

import shim.task.container
from protocol.proto import anyutil
from protocol.proto.runc import options_pb2
from protocol.proto.runctypes import runc_pb2
from protocol.proto.runtimeoptions.v1 import api_pb2 as runtimeoptions_pb2
from protocol.proto.task.v2 import shim_pb2
from protocol.proto.timeutil import GO_ZERO_TIME_SECONDS
from protocol.proto.types import mount_pb2
from protocol.proto.types import task_pb2 as types_pb2
from protocol.ttrpc.status import Code, TtrpcError
from shim.task.container import CreateOptions, container_record_path
from shim.task.process import ProcessIOLike, SignalChild, StdioStrings
from shim.task.runtime import RuncOptions, Runtime, RuntimeFailure
from shim.task.service import SERVICE_NAMES, TaskService
from shim.task.stats import Cgroup

# ----------------------------------------------------------------------------- fakes


class FakeReaper:
    def __init__(self) -> None:
        self.callbacks: list[Callable[[int, int], None]] = []

    def subscribe(self, callback: Callable[[int, int], None]) -> Callable[[], None]:
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)

    def exit(self, pid: int, status: int) -> None:
        for cb in list(self.callbacks):
            cb(pid, status)


class FakePublisher:
    def __init__(self) -> None:
        self.events: list[tuple[str, Message]] = []
        self.on_publish: Callable[[str, Message], None] | None = None

    def publish(self, topic: str, event: Message) -> None:
        if self.on_publish is not None:
            self.on_publish(topic, event)
        self.events.append((topic, event))

    def topics(self) -> list[str]:
        return [t for t, _ in self.events]


@dataclass
class FakeIO:
    process_id: str
    console_socket: str | None = None
    closed: bool = False
    stdin_closed: bool = False
    drained: int = 0
    resized: list[tuple[int, int]] = field(default_factory=list)

    def runtime_stdio(self) -> tuple[int | None, int | None, int | None]:
        return (None, None, None)

    async def started(self) -> None:
        pass

    def resize(self, width: int, height: int) -> None:
        self.resized.append((width, height))

    def close_stdin(self) -> None:
        self.stdin_closed = True

    async def drain(self, timeout: float) -> None:
        self.drained += 1

    async def close(self) -> None:
        self.closed = True


Hook = Callable[[], Awaitable[None] | None]


class FakeRuntime:
    """Pretends to be runc: writes pid files, remembers calls, fails on request."""

    def __init__(self, shared: Shared, bundle: str) -> None:
        self.shared = shared
        self.bundle = bundle

    async def _call(self, name: str, *args: Any) -> None:
        self.shared.calls.append((name, *args))
        hook = self.shared.hooks.pop(name, None)
        if hook is not None:
            result = hook()
            if result is not None:
                await result
        failure = self.shared.failures.get(name)
        if failure is not None:
            raise RuntimeFailure(failure)

    async def create(
        self,
        id: str,
        *,
        pid_file: str,
        console_socket: str | None,
        stdio: tuple[int | None, int | None, int | None],
        no_pivot: bool = False,
        no_new_keyring: bool = False,
    ) -> None:
        await self._call("create", id)
        Path(pid_file).write_text(str(self.shared.next_pid))
        self.shared.next_pid += 1

    async def start(self, id: str) -> None:
        await self._call("start", id)

    async def exec(
        self,
        id: str,
        process_json: bytes,
        *,
        pid_file: str,
        console_socket: str | None,
        stdio: tuple[int | None, int | None, int | None],
    ) -> None:
        self.shared.exec_specs.append(json.loads(process_json))
        pid = self.shared.next_pid
        Path(pid_file).write_text(str(pid))
        self.shared.next_pid += 1
        await self._call("exec", id)

    async def kill(self, id: str, signal: int, all: bool = False) -> None:
        await self._call("kill", id, signal, all)

    async def delete(self, id: str, force: bool = False) -> None:
        await self._call("delete", id, force)

    async def pause(self, id: str) -> None:
        await self._call("pause", id)

    async def resume(self, id: str) -> None:
        await self._call("resume", id)

    async def ps(self, id: str) -> list[int]:
        await self._call("ps", id)
        return list(self.shared.ps)

    async def update(self, id: str, resources_json: bytes) -> None:
        await self._call("update", id, resources_json)

    async def state(self, id: str) -> dict[str, Any]:
        await self._call("state", id)
        return dict(self.shared.runc_state)

    async def checkpoint(self, id: str, args: Sequence[str]) -> None:
        await self._call("checkpoint", id, list(args))

    async def restore(
        self, id: str, args: Sequence[str], *, stdio: tuple[int | None, int | None, int | None]
    ) -> None:
        await self._call("restore", id, list(args))
        pid_file = args[args.index("--pid-file") + 1]
        Path(pid_file).write_text(str(self.shared.next_pid))
        self.shared.next_pid += 1


@dataclass
class Shared:
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    create_options: list[CreateOptions] = field(default_factory=list)
    hooks: dict[str, Hook] = field(default_factory=dict)
    next_pid: int = 1000
    ps: list[int] = field(default_factory=list)
    runc_state: dict[str, Any] = field(default_factory=lambda: {"status": "stopped"})
    exec_specs: list[dict[str, Any]] = field(default_factory=list)
    ios: list[FakeIO] = field(default_factory=list)
    mounted: list[str] = field(default_factory=list)
    unmounted: list[str] = field(default_factory=list)
    runc_options: list[RuncOptions] = field(default_factory=list)
    io_fails: bool = False

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


@dataclass
class Harness:
    service: TaskService
    reaper: FakeReaper
    publisher: FakePublisher
    shared: Shared
    shutdowns: list[bool]
    tmp: Path

    def bundle(self, name: str = "b1", *, pid_ns: bool = True) -> str:
        path = self.tmp / name
        path.mkdir(exist_ok=True)
        namespaces = [{"type": "pid"}] if pid_ns else [{"type": "mount"}]
        (path / "config.json").write_text(json.dumps({"linux": {"namespaces": namespaces}}))
        return str(path)

    async def create(self, id: str = "c1", bundle: str | None = None, **kw: Any) -> int:
        req = shim_pb2.CreateTaskRequest(id=id, bundle=bundle or self.bundle(), **kw)
        return (await self.service.create(req)).pid

    async def run(self, id: str = "c1", bundle: str | None = None) -> int:
        pid = await self.create(id, bundle)
        await self.service.start(shim_pb2.StartRequest(id=id))
        return pid

    async def exec(self, id: str = "c1", exec_id: str = "e1", *, terminal: bool = False) -> None:
        spec = any_pb2.Any(
            type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
            value=json.dumps({"args": ["sh"], "cwd": "/"}).encode(),
        )
        await self.service.exec(
            shim_pb2.ExecProcessRequest(id=id, exec_id=exec_id, spec=spec, terminal=terminal)
        )

    async def state(self, id: str = "c1", exec_id: str = "") -> shim_pb2.StateResponse:
        return await self.service.state(shim_pb2.StateRequest(id=id, exec_id=exec_id))


def make_harness(
    tmp: Path,
    reaper: FakeReaper | None = None,
    signal_child: SignalChild | None = None,
    **collaborators: Any,
) -> Harness:
    shared = Shared()
    publisher = FakePublisher()
    reaper = reaper or FakeReaper()
    shutdowns: list[bool] = []

    def make_runtime(options: RuncOptions, bundle: str) -> Runtime:
        shared.runc_options.append(options)
        return FakeRuntime(shared, bundle)

    async def open_io(
        stdio: StdioStrings, process_id: str, options: CreateOptions
    ) -> ProcessIOLike:
        shared.create_options.append(options)
        if shared.io_fails:
            raise TtrpcError(Code.UNKNOWN, "cannot open stdio")
        io = FakeIO(process_id)
        shared.ios.append(io)
        return io

    def mount(mounts: Sequence[mount_pb2.Mount], target: str) -> None:
        shared.mounted.append(target)

    def unmount(target: str) -> None:
        shared.unmounted.append(target)

    service = TaskService(
        namespace="ns",
        publisher=publisher,
        reaper=reaper,  # type: ignore[arg-type]
        request_shutdown=lambda: shutdowns.append(True),
        make_runtime=make_runtime,
        open_io=open_io,
        mount=mount,
        unmount=unmount,
        signal_child=signal_child,
        **collaborators,
    )
    return Harness(service, reaper, publisher, shared, shutdowns, tmp)


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return make_harness(tmp_path)


async def expect_error(aw: Awaitable[Any], code: Code, message: str) -> None:
    with pytest.raises(TtrpcError) as info:
        await aw
    assert (info.value.code, info.value.message) == (code, message)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


# ----------------------------------------------------------------------------- tests


async def test_create_writes_files_publishes_and_reports_created(h: Harness) -> None:
    bundle = h.bundle()
    mounts = [mount_pb2.Mount(type="bind", source="/x", options=["rbind"])]
    pid = await h.create(bundle=bundle, rootfs=mounts, stdout="/fifo/out")
    assert pid == 1000
    assert h.shared.mounted == [f"{bundle}/rootfs"]
    for name, content in (("options.json", "{}"), ("runtime", "")):
        path = Path(bundle, name)
        assert path.read_text() == content
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert container_record_path(bundle).is_file()
    assert h.publisher.topics() == ["/tasks/create"]
    create = h.publisher.events[0][1]
    assert (create.container_id, create.pid, create.io.stdout) == ("c1", 1000, "/fifo/out")  # type: ignore[attr-defined]
    assert list(create.rootfs) == mounts  # type: ignore[attr-defined]
    st = await h.state()
    assert (st.id, st.pid, st.status, st.stdout, st.bundle) == (
        "c1",
        1000,
        types_pb2.CREATED,
        "/fifo/out",
        bundle,
    )
    assert st.exited_at.seconds == GO_ZERO_TIME_SECONDS


async def test_create_decodes_runc_options(h: Harness) -> None:
    bundle = h.bundle()
    opts = options_pb2.Options(binary_name="/opt/crun", root="/run/r", systemd_cgroup=True)
    await h.create(bundle=bundle, options=anyutil.pack(opts))
    assert h.shared.runc_options[-1] == RuncOptions(
        binary="/opt/crun", root="/run/r", systemd_cgroup=True
    )
    assert Path(bundle, "runtime").read_text() == "/opt/crun"
    assert json.loads(Path(bundle, "options.json").read_text()) == {
        "binary_name": "/opt/crun",
        "root": "/run/r",
        "systemd_cgroup": True,
    }


async def test_create_applies_runtime_options_toml(h: Harness) -> None:
    # What CRI (1.7+) sends a runtime it does not know as runc: the options section.
    body = b'SystemdCgroup = true\nBinaryName = "/opt/crun"\nNoPivotRoot = true\n'
    config = runtimeoptions_pb2.Options(config_body=body)
    bundle = h.bundle()
    await h.create(bundle=bundle, options=anyutil.pack(config))
    assert h.shared.runc_options[-1] == RuncOptions(binary="/opt/crun", systemd_cgroup=True)
    assert json.loads(Path(bundle, "options.json").read_text()) == {
        "binary_name": "/opt/crun",
        "no_pivot_root": True,
        "systemd_cgroup": True,
    }
    # ctr --runtime-config-path: a file's name; proto spellings are accepted too.
    path = h.tmp / "runtime.toml"
    path.write_text('systemd_cgroup = true\nroot = "/run/r"\nUnknownKey = 1\n')
    await h.create("c2", options=anyutil.pack(runtimeoptions_pb2.Options(config_path=str(path))))
    assert h.shared.runc_options[-1] == RuncOptions(root="/run/r", systemd_cgroup=True)
    for bad, message in (
        (runtimeoptions_pb2.Options(config_body=b"SystemdCgroup = "), "invalid TOML"),
        (runtimeoptions_pb2.Options(config_body=b'SystemdCgroup = "yes"\n'), "systemd_cgroup"),
        (runtimeoptions_pb2.Options(config_path=str(h.tmp / "nope.toml")), "nope.toml"),
    ):
        with pytest.raises(TtrpcError) as info:
            await h.create("c3", options=anyutil.pack(bad))
        assert info.value.code == Code.INVALID_ARGUMENT
        assert message in info.value.message, info.value.message


async def test_create_ignores_unknown_option_types(h: Harness) -> None:
    await h.create(options=any_pb2.Any(type_url="example.com.OtherRuntimeOptions", value=b"\x08"))
    assert h.shared.runc_options[-1] == RuncOptions()


async def test_create_decodes_legacy_create_options(h: Harness) -> None:
    # containerd's Go client sends this type to a runtime not named io.containerd.runc.*
    # (WithUIDOwner/WithGIDOwner, ctr --no-pivot); shim_cgroup is start's.
    legacy = runc_pb2.CreateOptions(
        no_pivot_root=True, no_new_keyring=True, shim_cgroup="/g", io_uid=7, io_gid=8
    )
    bundle = h.bundle()
    await h.create(bundle=bundle, options=anyutil.pack(legacy))
    assert h.shared.runc_options[-1] == RuncOptions()
    assert h.shared.create_options[-1] == CreateOptions(
        runc=RuncOptions(), no_pivot=True, no_new_keyring=True, io_uid=7, io_gid=8
    )
    assert Path(bundle, "options.json").read_text() == "{}"


@pytest.mark.parametrize("bad", ["a/b", "..", "x" * 77, ""])
async def test_create_rejects_bad_ids_and_leaves_nothing(h: Harness, bad: str) -> None:
    bundle = h.bundle()
    with pytest.raises(TtrpcError) as info:
        await h.create(bad, bundle)
    assert info.value.code == Code.INVALID_ARGUMENT
    assert sorted(p.name for p in Path(bundle).iterdir()) == ["config.json"]
    assert h.shared.calls == []


async def test_create_rejects_bad_bundles(h: Harness) -> None:
    no_config = h.tmp / "empty"
    no_config.mkdir()
    for bundle, message in (
        ("relative/b", "bundle path 'relative/b' must be absolute"),
        (str(h.tmp / "missing"), f"bundle {h.tmp}/missing is not a directory"),
        (str(no_config), f"bundle {no_config} has no config.json"),
    ):
        await expect_error(h.create("c1", bundle), Code.INVALID_ARGUMENT, message)
    assert list(no_config.iterdir()) == []
    assert h.shared.calls == []


async def test_create_twice_is_already_exists_and_keeps_the_first(h: Harness) -> None:
    await h.run()
    other = h.bundle("b2")
    await expect_error(h.create("c1", other), Code.ALREADY_EXISTS, "container c1: already exists")
    assert h.shared.names() == ["create", "start"]
    assert sorted(p.name for p in Path(other).iterdir()) == ["config.json"]
    assert (await h.state()).status == types_pb2.RUNNING


async def test_runc_create_failure_undoes_everything(h: Harness) -> None:
    bundle = h.bundle()
    h.shared.failures["create"] = "runc create failed: boom"
    mounts = [mount_pb2.Mount(type="bind", source="/x")]
    await expect_error(
        h.create(bundle=bundle, rootfs=mounts),
        Code.UNKNOWN,
        "OCI runtime create failed: runc create failed: boom",
    )
    assert h.shared.ios[0].closed
    assert h.shared.unmounted == [f"{bundle}/rootfs"]
    assert sorted(p.name for p in Path(bundle).iterdir()) == ["config.json", "rootfs"]
    await expect_error(h.state(), Code.NOT_FOUND, "container not created: not found")
    # The id is free again.
    h.shared.failures.clear()
    assert await h.create(bundle=bundle) > 0


async def test_io_failure_before_runc_leaves_nothing(h: Harness) -> None:
    bundle = h.bundle()
    h.shared.io_fails = True
    await expect_error(h.create(bundle=bundle), Code.UNKNOWN, "cannot open stdio")
    assert h.shared.calls == []
    assert sorted(p.name for p in Path(bundle).iterdir()) == ["config.json"]


async def test_stats_need_a_cgroup(h: Harness) -> None:
    await h.create()
    # The fake runtime's pids are no processes: no cgroup is known for c1.
    await expect_error(
        h.service.stats(shim_pb2.StatsRequest(id="c1")),
        Code.NOT_FOUND,
        "cgroup does not exist: not found",
    )


async def test_unknown_ids_are_not_found(h: Harness) -> None:
    s = h.service
    missing = "container not created: not found"
    for aw in (
        s.state(shim_pb2.StateRequest(id="nope")),
        s.start(shim_pb2.StartRequest(id="nope")),
        s.kill(shim_pb2.KillRequest(id="nope", signal=9)),
        s.delete(shim_pb2.DeleteRequest(id="nope")),
        s.wait(shim_pb2.WaitRequest(id="nope")),
        s.pids(shim_pb2.PidsRequest(id="nope")),
        s.pause(shim_pb2.PauseRequest(id="nope")),
        s.close_io(shim_pb2.CloseIORequest(id="nope")),
        s.stats(shim_pb2.StatsRequest(id="nope")),
    ):
        await expect_error(aw, Code.NOT_FOUND, missing)
    await h.create()
    await expect_error(h.state("c1", "e9"), Code.NOT_FOUND, "process does not exist e9: not found")


async def test_start_twice_and_state_errors(h: Harness) -> None:
    await h.run()
    assert h.publisher.topics() == ["/tasks/create", "/tasks/start"]
    await expect_error(
        h.service.start(shim_pb2.StartRequest(id="c1")),
        Code.UNKNOWN,
        "cannot start a running process",
    )
    await expect_error(
        h.service.delete(shim_pb2.DeleteRequest(id="c1")),
        Code.UNKNOWN,
        "cannot delete a running process",
    )
    await expect_error(
        h.service.resume(shim_pb2.ResumeRequest(id="c1")),
        Code.UNKNOWN,
        "cannot resume a running process",
    )


async def test_start_failure_reports_runc_message(h: Harness) -> None:
    await h.create()
    h.shared.failures["start"] = "cannot start container"
    await expect_error(
        h.service.start(shim_pb2.StartRequest(id="c1")),
        Code.UNKNOWN,
        "OCI runtime start failed: cannot start container",
    )
    assert (await h.state()).status == types_pb2.CREATED


async def test_kill_maps_runc_errors(h: Harness) -> None:
    await h.run()
    await h.service.kill(shim_pb2.KillRequest(id="c1", signal=15, all=True))
    assert h.shared.calls[-1] == ("kill", "c1", 15, True)
    for runc_msg, code, message in (
        ("container not running", Code.NOT_FOUND, "process already finished: not found"),
        ("kill: No Such Process", Code.NOT_FOUND, "process already finished: not found"),
        ("container c1 does not exist", Code.NOT_FOUND, "no such container: not found"),
        ("weird", Code.UNKNOWN, "unknown error after kill: weird"),
    ):
        h.shared.failures["kill"] = runc_msg
        await expect_error(h.service.kill(shim_pb2.KillRequest(id="c1", signal=9)), code, message)


async def test_pause_resume_events_states_and_errors(h: Harness) -> None:
    await h.create()
    await expect_error(
        h.service.pause(shim_pb2.PauseRequest(id="c1")),
        Code.UNKNOWN,
        "cannot pause task in created state",
    )
    await expect_error(
        h.service.resume(shim_pb2.ResumeRequest(id="c1")),
        Code.UNKNOWN,
        "cannot resume task in created state",
    )
    await h.service.start(shim_pb2.StartRequest(id="c1"))
    await h.exec()
    seen: list[int] = []

    async def during_pause() -> None:
        seen.append((await h.state()).status)

    h.shared.hooks["pause"] = during_pause
    await h.service.pause(shim_pb2.PauseRequest(id="c1"))
    assert seen == [types_pb2.PAUSING]
    assert (await h.state()).status == types_pb2.PAUSED
    await expect_error(
        h.service.pause(shim_pb2.PauseRequest(id="c1")),
        Code.UNKNOWN,
        "cannot pause a paused container",
    )
    await expect_error(
        h.service.start(shim_pb2.StartRequest(id="c1")),
        Code.UNKNOWN,
        "cannot start a paused process",
    )
    await expect_error(
        h.service.exec(
            shim_pb2.ExecProcessRequest(
                id="c1", exec_id="e2", spec=any_pb2.Any(type_url="x", value=b"{}")
            )
        ),
        Code.UNKNOWN,
        "cannot exec in a paused state",
    )
    await h.service.resume(shim_pb2.ResumeRequest(id="c1"))
    assert (await h.state()).status == types_pb2.RUNNING
    assert h.publisher.topics()[-2:] == ["/tasks/paused", "/tasks/resumed"]


async def test_pause_failure(h: Harness) -> None:
    await h.run()
    h.shared.failures["pause"] = "freezer"
    await expect_error(
        h.service.pause(shim_pb2.PauseRequest(id="c1")),
        Code.UNKNOWN,
        "OCI runtime pause failed: freezer",
    )
    assert (await h.state()).status == types_pb2.RUNNING


async def test_exit_then_delete_and_forget(h: Harness) -> None:
    pid = await h.run()
    waiter = asyncio.create_task(h.service.wait(shim_pb2.WaitRequest(id="c1")))
    await settle()
    assert not waiter.done()
    h.reaper.exit(pid, 3)
    resp = await waiter
    assert resp.exit_status == 3
    st = await h.state()
    assert (st.status, st.exit_status, st.exited_at) == (types_pb2.STOPPED, 3, resp.exited_at)
    await expect_error(
        h.service.start(shim_pb2.StartRequest(id="c1")),
        Code.UNKNOWN,
        "cannot start a stopped process",
    )
    await expect_error(
        h.service.pause(shim_pb2.PauseRequest(id="c1")),
        Code.UNKNOWN,
        "cannot pause a stopped container",
    )
    await expect_error(
        h.service.update(
            shim_pb2.UpdateTaskRequest(id="c1", resources=any_pb2.Any(type_url="x", value=b"{}"))
        ),
        Code.UNKNOWN,
        "cannot update a stopped container",
    )
    deleted = await h.service.delete(shim_pb2.DeleteRequest(id="c1"))
    assert (deleted.pid, deleted.exit_status, deleted.exited_at) == (pid, 3, resp.exited_at)
    assert h.publisher.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    delete_event = h.publisher.events[-1][1]
    assert (delete_event.container_id, delete_event.exit_status) == ("c1", 3)  # type: ignore[attr-defined]
    assert h.shared.ios[0].closed
    assert ("delete", "c1", False) in h.shared.calls
    await expect_error(h.state(), Code.NOT_FOUND, "container not created: not found")


async def test_delete_ignores_runc_does_not_exist(h: Harness) -> None:
    pid = await h.run()
    h.reaper.exit(pid, 0)
    await h.service.wait(shim_pb2.WaitRequest(id="c1"))
    h.shared.failures["delete"] = "container c1 does not exist"
    await h.service.delete(shim_pb2.DeleteRequest(id="c1"))
    h.shared.failures["delete"] = "busy"
    await h.create("c2")
    await expect_error(
        h.service.delete(shim_pb2.DeleteRequest(id="c2")),
        Code.UNKNOWN,
        "failed to delete task: busy",
    )


async def test_delete_created_init_releases_waiters_without_exit_event(h: Harness) -> None:
    pid = await h.create()
    waiter = asyncio.create_task(h.service.wait(shim_pb2.WaitRequest(id="c1")))
    await settle()
    await h.service.delete(shim_pb2.DeleteRequest(id="c1"))
    assert (await waiter).exit_status == 0
    h.reaper.exit(pid, 137)  # runc delete killed the never-started init
    await settle()
    assert h.publisher.topics() == ["/tasks/create", "/tasks/delete"]


async def test_shutdown_only_when_empty(h: Harness) -> None:
    pid = await h.run()
    await h.service.shutdown(shim_pb2.ShutdownRequest(id="c1"))
    assert h.shutdowns == []
    h.reaper.exit(pid, 0)
    await h.service.wait(shim_pb2.WaitRequest(id="c1"))
    await h.service.delete(shim_pb2.DeleteRequest(id="c1"))
    await h.service.shutdown(shim_pb2.ShutdownRequest(id="c1"))
    assert h.shutdowns == [True]


async def test_connect(h: Harness) -> None:
    import os

    pid = await h.create()
    resp = await h.service.connect(shim_pb2.ConnectRequest(id="c1"))
    assert (resp.shim_pid, resp.task_pid) == (os.getpid(), pid)
    resp = await h.service.connect(shim_pb2.ConnectRequest(id="other"))
    assert (resp.shim_pid, resp.task_pid) == (os.getpid(), 0)


async def test_pids_marks_exec_processes(h: Harness) -> None:
    pid = await h.run()
    await h.exec()
    exec_pid = (await h.service.start(shim_pb2.StartRequest(id="c1", exec_id="e1"))).pid
    h.shared.ps = [pid, exec_pid]
    resp = await h.service.pids(shim_pb2.PidsRequest(id="c1"))
    assert [p.pid for p in resp.processes] == [pid, exec_pid]
    assert not resp.processes[0].HasField("info")
    details = anyutil.unpack(resp.processes[1].info, options_pb2.ProcessDetails)
    assert details.exec_id == "e1"
    assert resp.processes[1].info.type_url == "containerd.runc.v1.ProcessDetails"


async def test_update_resize_closeio(h: Harness) -> None:
    await h.run()
    await expect_error(
        h.service.update(shim_pb2.UpdateTaskRequest(id="c1")),
        Code.INVALID_ARGUMENT,
        "update: resources are required",
    )
    res = any_pb2.Any(type_url="x", value=b'{"cpu":{}}')
    await h.service.update(shim_pb2.UpdateTaskRequest(id="c1", resources=res))
    assert h.shared.calls[-1] == ("update", "c1", b'{"cpu":{}}')
    await h.service.resize_pty(shim_pb2.ResizePtyRequest(id="c1", width=70000, height=30))
    assert h.shared.ios[0].resized == [(70000 & 0xFFFF, 30)]
    await h.service.close_io(shim_pb2.CloseIORequest(id="c1", stdin=True))
    assert h.shared.ios[0].stdin_closed


async def test_update_refuses_bad_resources_before_runc(h: Harness) -> None:
    await h.run()
    calls = len(h.shared.calls)
    for value, message in (
        (b"not json", "update: resources are not valid JSON: Expecting value: line 1 column 1"),
        (b'{"memory": ', "update: resources are not valid JSON: Expecting value: line 1"),
        (b"\xff", "update: resources are not valid JSON: "),
        (b"[1]", "update: resources must be a JSON object (LinuxResources), not [1]"),
    ):
        res = any_pb2.Any(type_url="x", value=value)
        with pytest.raises(TtrpcError) as info:
            await h.service.update(shim_pb2.UpdateTaskRequest(id="c1", resources=res))
        assert info.value.code == Code.INVALID_ARGUMENT
        assert info.value.message.startswith(message), info.value.message
    # runc was never run.
    assert h.shared.calls[calls:] == []


class FakeServer:
    def __init__(self) -> None:
        self.services: dict[str, dict[str, Any]] = {}

    def register(self, service: str, methods: dict[str, Any]) -> None:
        self.services[service] = methods


async def test_register_maps_all_methods_under_v2_and_v3(h: Harness) -> None:
    from protocol.ttrpc.server import RequestContext

    server = FakeServer()
    h.service.register(server)  # type: ignore[arg-type]
    assert set(server.services) == set(SERVICE_NAMES)
    for methods in server.services.values():
        assert len(methods) == 17
        assert methods["Wait"].request_type is shim_pb2.WaitRequest
    ctx = RequestContext("containerd.task.v3.Task", "Connect", {}, None, 1)
    connect = server.services["containerd.task.v3.Task"]["Connect"]
    resp = await connect.handler(ctx, shim_pb2.ConnectRequest(id="x"))
    assert resp.task_pid == 0


async def test_deleted_exec_leaves_no_exit_record(h: Harness) -> None:
    from shim.records.state import ExitLog

    def records() -> list[str]:
        exits, found = ExitLog.load(h.bundle(), "c1")
        exits.close()
        return sorted(found)

    await h.run()
    await h.exec()
    exec_pid = (await h.service.start(shim_pb2.StartRequest(id="c1", exec_id="e1"))).pid
    h.reaper.exit(exec_pid, 4)
    resp = await h.service.wait(shim_pb2.WaitRequest(id="c1", exec_id="e1"))
    assert resp.exit_status == 4
    assert records() == ["e1"]  # persisted before Wait returned
    await h.service.delete(shim_pb2.DeleteRequest(id="c1", exec_id="e1"))
    # A restarted shim reads every record in the log: a deleted exec must not come back.
    assert records() == []


async def test_only_exit_records_are_fsynced(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from shim.task.container import container_record_path

    synced: list[str] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def sync(fd: int, real: Callable[[int], None] = real) -> None:
            synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
            real(fd)

        monkeypatch.setattr(os, name, sync)
    pid = await h.run()
    # The container record (and the events' outbox) survive a process crash without
    # a sync; only an exit is synced: the exit log, and its directory when it is new.
    assert container_record_path(h.bundle()).is_file()
    assert synced == []
    h.reaper.exit(pid, 0)
    await h.service.wait(shim_pb2.WaitRequest(id="c1"))
    assert synced == ["pyshim", "exits.log"]


@dataclass
class RecordingOomWatch:
    calls: list[tuple[str, str]] = field(default_factory=list)

    def watch(self, container_id: str, cgroup: Cgroup) -> None:
        self.calls.append(("watch", container_id))

    def flush(self, container_id: str) -> None:
        self.calls.append(("flush", container_id))

    def unwatch(self, container_id: str) -> None:
        self.calls.append(("unwatch", container_id))


def _oom_harness(tmp: Path) -> tuple[Harness, RecordingOomWatch]:
    oom = RecordingOomWatch()
    cgroup = Cgroup(unified=True, dirs={"": str(tmp)})
    return make_harness(tmp, oom=oom, find_cgroup=lambda pid: cgroup), oom


async def test_oom_is_watched_from_create_not_only_from_start(tmp_path: Path) -> None:
    # A container that allocates past its limit at once is killed before Start
    # returns: the watch must already be there (the Go shim watches from create).
    h, oom = _oom_harness(tmp_path)
    await h.create()
    assert oom.calls == [("watch", "c1")]
    await h.service.start(shim_pb2.StartRequest(id="c1"))
    # Watching again at Start would take a new baseline and miss a kill in between.
    assert oom.calls == [("watch", "c1")]


async def test_failed_create_stops_watching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, oom = _oom_harness(tmp_path)

    def disk_full(path: Path, record: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shim.task.container, "write_record", disk_full)
    with pytest.raises(OSError):
        await h.create()
    assert oom.calls == [("watch", "c1"), ("unwatch", "c1")]


async def test_oom_is_read_the_moment_the_init_is_reaped(tmp_path: Path) -> None:
    # Under runc's systemd driver the container's scope, and its memory.events, goes
    # as soon as systemd sees it empty: the kill is read before anything awaits.
    h, oom = _oom_harness(tmp_path)
    pid = await h.run()
    oom.calls.clear()
    h.reaper.exit(pid, 137)
    assert oom.calls == [("flush", "c1")]
    await h.service.wait(shim_pb2.WaitRequest(id="c1"))
    assert oom.calls[-1] == ("flush", "c1")
