"""One container: its bundle, runtime, init process and exec processes.

Create is all-or-nothing: every step registers its undo, and a failure anywhere runs
them in reverse, so a refused Create leaves no mount, open fifo, runc container or
shim file behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import msgspec
from google.protobuf import any_pb2
from google.protobuf.json_format import MessageToDict

from protocol.proto import anyutil
from protocol.proto.events import task_pb2 as events_pb2
from protocol.proto.runc import options_pb2
from protocol.proto.runctypes import runc_pb2
from protocol.proto.runtimeoptions.v1 import api_pb2 as runtimeoptions_pb2
from protocol.proto.task.v2 import shim_pb2
from protocol.proto.types import mount_pb2
from protocol.ttrpc.status import Code, TtrpcError
from shim.records.state import ExitLog, ExitRecord, read_record, write_record
from shim.task.exits import Exit, ExitRouter
from shim.task.ids import validate_id
from shim.task.process import (
    EventSink,
    ExecProcess,
    InitProcess,
    ProcessIOLike,
    SignalChild,
    StdioStrings,
    not_found,
    read_pid_file,
    unknown,
)
from shim.task.runtime import RuncOptions, Runtime, RuntimeFailure

if TYPE_CHECKING:
    from shim.task.stats import Cgroup

__all__ = [
    "MAX_EXECS_PER_CONTAINER",
    "Container",
    "ContainerRecord",
    "CreateOptions",
    "OomWatch",
    "Toolkit",
    "container_record_path",
    "decode_options",
]

log = logging.getLogger(__name__)

RECORD_VERSION = 1
# Each exec is kept (memory, and once started its pipes and fds) until containerd
# deletes it, even after it exited; a client that never calls Delete would otherwise
# grow the shim until it runs out of fds and can serve no container. containerd's own
# workloads (probes, `ctr exec`) keep a handful alive at once, far below this.
MAX_EXECS_PER_CONTAINER = 1024
# The exit status of an init whose real status died with an earlier shim.
UNKNOWN_EXIT_STATUS = 255


class ContainerRecord(msgspec.Struct, kw_only=True):
    """What a restarted shim needs to find a container again."""

    version: int = RECORD_VERSION
    id: str
    bundle: str
    namespace: str
    pid: int
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    binary: str = "runc"
    root: str = "/run/containerd/runc"
    systemd_cgroup: bool = False
    criu_path: str = ""
    kill_all_on_exit: bool = True
    rootfs_mounted: bool = False


def container_record_path(bundle: str) -> Path:
    return Path(bundle) / "pyshim" / "container.json"


@dataclass(frozen=True)
class CreateOptions:
    runc: RuncOptions
    no_pivot: bool = False
    no_new_keyring: bool = False
    io_uid: int | None = None
    io_gid: int | None = None
    # Go's encoding/json of the runc Options (snake_case, zero values omitted).
    options_json: str = "{}"
    # As the client gave it ("" = the default runc); written to <bundle>/runtime.
    binary_name: str = ""
    # CRIU's work dir for a restore ("" = <bundle>/work).
    criu_work_path: str = ""


class OomWatch(Protocol):
    """shim.task.oom.OomWatcher as containers use it."""

    def watch(self, container_id: str, cgroup: Cgroup) -> None: ...
    def flush(self, container_id: str) -> None: ...
    def unwatch(self, container_id: str) -> None: ...


def _no_cgroup(pid: int) -> Cgroup | None:
    return None


def _no_pidfd(pid: int) -> int | None:
    return None


@dataclass(frozen=True)
class Toolkit:
    """The shim's collaborators, injectable so the task logic is tested without runc."""

    namespace: str
    events: EventSink
    router: ExitRouter
    make_runtime: Callable[[RuncOptions, str], Runtime]
    # (stdio, process id, options) -> opened ProcessIO
    open_io: Callable[[StdioStrings, str, CreateOptions], Awaitable[ProcessIOLike]]
    mount: Callable[[Sequence[mount_pb2.Mount], str], None]
    unmount: Callable[[str], None]
    # The default knows no cgroups: fake runtimes' pids are not real processes.
    find_cgroup: Callable[[int], Cgroup | None] = _no_cgroup
    oom: OomWatch | None = None
    # A pidfd for a live pid, None when it is gone (or not a real process, for fakes).
    pidfd_open: Callable[[int], int | None] = _no_pidfd
    # Signals an init that is our child without running the runtime; None: always the
    # runtime (fakes' pids are not real processes).
    signal_child: SignalChild | None = None


def decode_options(value: any_pb2.Any | None) -> CreateOptions:
    if value is None or not value.type_url:
        return CreateOptions(runc=RuncOptions())
    if anyutil.is_type(value, runtimeoptions_pb2.Options):
        value = anyutil.pack(runc_options_from_config(value))
    if anyutil.is_type(value, options_pb2.Options):
        try:
            opts = anyutil.unpack(value, options_pb2.Options)
        except anyutil.AnyTypeError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"invalid runtime options: {exc}") from exc
        defaults = RuncOptions()
        return CreateOptions(
            runc=RuncOptions(
                binary=opts.binary_name or defaults.binary,
                root=opts.root or defaults.root,
                systemd_cgroup=opts.systemd_cgroup,
                criu_path=opts.criu_path,
            ),
            no_pivot=opts.no_pivot_root,
            no_new_keyring=opts.no_new_keyring,
            io_uid=opts.io_uid or None,
            io_gid=opts.io_gid or None,
            binary_name=opts.binary_name,
            criu_work_path=opts.criu_work_path,
            options_json=json.dumps(
                MessageToDict(opts, preserving_proto_field_name=True), separators=(",", ":")
            ),
        )
    if anyutil.is_type(value, runc_pb2.CreateOptions):
        # What containerd's Go client sends a runtime not named io.containerd.runc.*;
        # shim_cgroup is start's. Of the restore-only fields the Go shim's restore
        # uses criu_work_path alone (containerd itself reads criu_image_path).
        try:
            legacy = anyutil.unpack(value, runc_pb2.CreateOptions)
        except anyutil.AnyTypeError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"invalid runtime options: {exc}") from exc
        return CreateOptions(
            runc=RuncOptions(),
            no_pivot=legacy.no_pivot_root,
            no_new_keyring=legacy.no_new_keyring,
            io_uid=legacy.io_uid or None,
            io_gid=legacy.io_gid or None,
            criu_work_path=legacy.criu_work_path,
        )
    # Other runtimes' option types are not ours.
    log.info("ignoring runtime options of type %s", value.type_url)
    return CreateOptions(runc=RuncOptions())


def runc_options_from_config(value: any_pb2.Any) -> options_pb2.Options:
    """containerd's generic options (TOML: CRI's `options` section, ctr's
    --runtime-config-path) as the runc options they spell, e.g. `SystemdCgroup = true`."""
    from shim.task import runtimeconfig

    try:
        given = anyutil.unpack(value, runtimeoptions_pb2.Options)
        table = runtimeconfig.read_config(given.config_path, given.config_body)
    except (anyutil.AnyTypeError, ValueError) as exc:
        raise TtrpcError(Code.INVALID_ARGUMENT, f"invalid runtime options: {exc}") from None
    opts = options_pb2.Options()
    fields = {runtimeconfig.normalize(f.name): f.name for f in opts.DESCRIPTOR.fields}
    for key, item in table.items():
        if key not in fields:
            log.info("ignoring runtime option %s", key)
            continue
        try:
            setattr(opts, fields[key], item)
        except (TypeError, ValueError) as exc:
            raise TtrpcError(
                Code.INVALID_ARGUMENT, f"invalid runtime option {fields[key]}: {exc}"
            ) from None
    return opts


def validate_bundle(bundle: str) -> None:
    if not bundle or not os.path.isabs(bundle):
        raise TtrpcError(Code.INVALID_ARGUMENT, f"bundle path {bundle!r} must be absolute")
    if not os.path.isdir(bundle):
        raise TtrpcError(Code.INVALID_ARGUMENT, f"bundle {bundle} is not a directory")
    if not os.path.isfile(os.path.join(bundle, "config.json")):
        raise TtrpcError(Code.INVALID_ARGUMENT, f"bundle {bundle} has no config.json")


def has_private_pid_namespace(bundle: str) -> bool:
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec = json.load(f)
        namespaces = spec.get("linux", {}).get("namespaces", []) or []
        return any(ns.get("type") == "pid" and not ns.get("path") for ns in namespaces)
    except (OSError, ValueError, AttributeError):
        return False


def _create_event(req: shim_pb2.CreateTaskRequest, pid: int) -> events_pb2.TaskCreate:
    return events_pb2.TaskCreate(
        container_id=req.id,
        bundle=req.bundle,
        rootfs=req.rootfs,
        io=events_pb2.TaskIO(
            stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal
        ),
        checkpoint=req.checkpoint,
        pid=pid,
    )


def _write_private(path: Path, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class Container:
    def __init__(
        self,
        *,
        id: str,
        bundle: str,
        runtime: Runtime,
        toolkit: Toolkit,
        options: CreateOptions,
        stdio: StdioStrings,
        kill_all_on_exit: bool,
        rootfs_mounted: bool,
        exits: ExitLog | None = None,
    ) -> None:
        self.id = id
        self.bundle = bundle
        self.exits = exits or ExitLog(bundle)
        self.runtime = runtime
        self.options = options
        self.rootfs_mounted = rootfs_mounted
        self.kill_all_on_exit = kill_all_on_exit
        self._toolkit = toolkit
        # Found once from the init's /proc entry: it outlives the init's exit, and
        # Stats must keep answering about the same cgroup.
        self.cgroup: Cgroup | None = None
        self._orphan_pidfd: int | None = None
        self.execs: dict[str, ExecProcess] = {}
        self.init = InitProcess(
            container_id=id,
            bundle=bundle,
            stdio=stdio,
            runtime=runtime,
            events=toolkit.events,
            router=toolkit.router,
            exits=self.exits,
            kill_all_on_exit=kill_all_on_exit,
            wait_execs=self._wait_execs,
            signal_child=toolkit.signal_child,
            on_restored=self._restored,
            on_reaped=self._flush_oom,
        )

    @property
    def rootfs(self) -> str:
        return os.path.join(self.bundle, "rootfs")

    # -- create ---------------------------------------------------------------------

    @classmethod
    async def create(cls, req: shim_pb2.CreateTaskRequest, toolkit: Toolkit) -> Container:
        """Runs after id and bundle were validated and the id reserved."""
        if req.checkpoint:
            from shim.task.checkpoint import validate_restore_paths

            validate_restore_paths(req.checkpoint, req.parent_checkpoint)
        options = decode_options(req.options if req.HasField("options") else None)
        bundle = Path(req.bundle)
        stdio = StdioStrings(req.stdin, req.stdout, req.stderr, req.terminal)
        runtime = toolkit.make_runtime(options.runc, req.bundle)
        container = cls(
            id=req.id,
            bundle=req.bundle,
            runtime=runtime,
            toolkit=toolkit,
            options=options,
            stdio=stdio,
            kill_all_on_exit=not has_private_pid_namespace(req.bundle),
            rootfs_mounted=bool(req.rootfs),
        )
        async with contextlib.AsyncExitStack() as undo:
            undo.callback(container.exits.close)
            for name, data in (
                ("options.json", options.options_json),
                ("runtime", options.binary_name),
            ):
                undo.callback(_unlink, bundle / name)
                _write_private(bundle / name, data)
            if req.rootfs:
                rootfs = bundle / "rootfs"
                rootfs.mkdir(mode=0o711, exist_ok=True)
                try:
                    toolkit.mount(req.rootfs, str(rootfs))
                except TtrpcError:
                    raise
                except Exception as exc:
                    raise unknown(f"failed to mount rootfs component: {exc}") from exc
                undo.callback(toolkit.unmount, str(rootfs))
            io = await toolkit.open_io(stdio, req.id, options)
            undo.push_async_callback(io.close)
            pid_file = bundle / "init.pid"
            undo.callback(_unlink, pid_file)
            if req.checkpoint:
                undo.callback(_unlink, container_record_path(req.bundle))
                container._created_from_checkpoint(req, io, str(pid_file))
                undo.pop_all()
                return container
            with toolkit.router.window() as window:
                try:
                    await runtime.create(
                        req.id,
                        pid_file=str(pid_file),
                        console_socket=io.console_socket,
                        stdio=io.runtime_stdio(),
                        no_pivot=options.no_pivot,
                        no_new_keyring=options.no_new_keyring,
                    )
                except RuntimeFailure as exc:
                    raise unknown(f"OCI runtime create failed: {exc.message}") from exc
                undo.push_async_callback(container._force_delete)
                await io.started()
                pid = read_pid_file(pid_file)
                container.init.created(pid, io)
                container.cgroup = toolkit.find_cgroup(pid)
                # From create on, as the Go shim since containerd 2.2: a container
                # that allocates past its limit at once is killed before Start returns.
                container.watch_oom()
                undo.callback(container.unwatch_oom)
                undo.callback(_unlink, container_record_path(req.bundle))
                # Read only by a shim restarted on this bundle after a process crash,
                # which the page cache survives; after a kernel crash the container is
                # gone and `delete` does not read it. Exit records stay fsynced.
                write_record(container_record_path(req.bundle), container.record())
                toolkit.events.publish("/tasks/create", _create_event(req, pid))
                early = toolkit.router.register(pid, container.init, window)
            undo.pop_all()
        if early is not None:
            container.init.reaped(early)
        return container

    def _created_from_checkpoint(
        self, req: shim_pb2.CreateTaskRequest, io: ProcessIOLike, pid_file: str
    ) -> None:
        """The rest of a Create from a checkpoint: the restore itself waits for Start."""
        from shim.task.checkpoint import RestoreConfig

        self.init.created_from_checkpoint(
            io,
            RestoreConfig(
                image_path=req.checkpoint,
                work_path=self.options.criu_work_path or os.path.join(self.bundle, "work"),
                parent_path=req.parent_checkpoint,
                pid_file=pid_file,
                no_pivot=self.options.no_pivot,
            ),
        )
        # pid 0 until Start: a shim restarted before then finds no live init.
        write_record(container_record_path(self.bundle), self.record())
        self._toolkit.events.publish("/tasks/create", _create_event(req, 0))

    def _restored(self, pid: int) -> None:
        """The restored init runs as ``pid`` (called within Start)."""
        self.cgroup = self._toolkit.find_cgroup(pid)
        self.watch_oom()
        write_record(container_record_path(self.bundle), self.record())

    async def _force_delete(self) -> None:
        with contextlib.suppress(RuntimeFailure):
            await self.runtime.delete(self.id, force=True)

    def record(self) -> ContainerRecord:
        stdio = self.init.stdio
        return ContainerRecord(
            id=self.id,
            bundle=self.bundle,
            namespace=self._toolkit.namespace,
            pid=self.init.pid,
            stdin=stdio.stdin,
            stdout=stdio.stdout,
            stderr=stdio.stderr,
            terminal=stdio.terminal,
            binary=self.options.runc.binary,
            root=self.options.runc.root,
            systemd_cgroup=self.options.runc.systemd_cgroup,
            criu_path=self.options.runc.criu_path,
            kill_all_on_exit=self.kill_all_on_exit,
            rootfs_mounted=self.rootfs_mounted,
        )

    # -- recovery ---------------------------------------------------------------------

    @classmethod
    async def recover(cls, bundle: str, toolkit: Toolkit) -> Container | None:
        """Rebuild a container from the records an earlier shim left in its bundle."""
        record = read_record(container_record_path(bundle), ContainerRecord)
        if record is None:
            return None
        options = CreateOptions(
            runc=RuncOptions(
                binary=record.binary,
                root=record.root,
                systemd_cgroup=record.systemd_cgroup,
                criu_path=record.criu_path,
            )
        )
        exit_log, exits = ExitLog.load(bundle, record.id)
        container = cls(
            id=record.id,
            bundle=record.bundle,
            runtime=toolkit.make_runtime(options.runc, record.bundle),
            toolkit=toolkit,
            options=options,
            stdio=StdioStrings(record.stdin, record.stdout, record.stderr, record.terminal),
            kill_all_on_exit=record.kill_all_on_exit,
            rootfs_mounted=record.rootfs_mounted,
            exits=exit_log,
        )
        try:
            init_exit = exits.get(record.id)
            if init_exit is not None:
                container.init.restore_exit(init_exit)
            else:
                await container._recover_live_init(record.pid)
        except BaseException:
            exit_log.close()
            raise
        for exit in exits.values():
            if exit.exec_id:
                exec_ = container._new_exec(exit.exec_id, StdioStrings(), b"")
                exec_.restore_exit(exit)
                container.execs[exit.exec_id] = exec_
        return container

    async def _recover_live_init(self, pid: int) -> None:
        # Opened before asking runc: if runc then says the container runs, this fd is
        # that process, not a later one that reused the pid.
        pidfd = self._toolkit.pidfd_open(pid) if pid > 0 else None
        try:
            state = await self.runtime.state(self.id)
            status = str(state.get("status", "stopped"))
        except RuntimeFailure:
            state, status = {}, "stopped"
        if pid <= 0 and status != "stopped":
            # Created from a checkpoint by a shim that died during the restore, before
            # it could record the pid: runc knows it (read just now, so a pidfd opened
            # after it is that process unless it died and the pid was reused since).
            pid = int(state.get("pid") or 0)
            status = status if pid > 0 else "stopped"
            if pid > 0:
                pidfd = self._toolkit.pidfd_open(pid)
        if status == "stopped" and pidfd is not None:
            os.close(pidfd)
        if status == "stopped":
            # The exit happened while no shim could reap it: its status is lost. Record
            # a made-up one once so every later answer agrees.
            exit = ExitRecord(
                container_id=self.id,
                exec_id="",
                pid=pid,
                exit_status=UNKNOWN_EXIT_STATUS,
                exited_at_ns=time.time_ns(),
            )
            self.exits.record(exit)
            self.init.restore_exit(exit)
            return
        self.init.restore(pid, status)
        self.cgroup = self._toolkit.find_cgroup(pid)
        self.watch_oom()
        self._toolkit.router.register(pid, self.init, None)
        if pidfd is not None:
            self._watch_orphan(pid, pidfd)

    def _watch_orphan(self, pid: int, pidfd: int) -> None:
        """Notice the death of an init that is no longer our child.

        The earlier shim was its parent; when it died the init was re-parented to the
        nearest subreaper above it, so our reaper never sees this exit and its status
        is lost. Without this, State would say RUNNING and Wait would block forever
        after the container died. A pidfd becomes readable when the process exits.
        """
        self._orphan_pidfd = pidfd

        def exited() -> None:
            self._unwatch_orphan()
            self._toolkit.router.unregister(pid, self.init)
            self.init.reaped(Exit(pid, UNKNOWN_EXIT_STATUS, time.time_ns()))

        asyncio.get_running_loop().add_reader(pidfd, exited)

    def _unwatch_orphan(self) -> None:
        pidfd, self._orphan_pidfd = self._orphan_pidfd, None
        if pidfd is not None:
            asyncio.get_running_loop().remove_reader(pidfd)
            os.close(pidfd)

    # -- execs ------------------------------------------------------------------------

    def process(self, exec_id: str) -> InitProcess | ExecProcess:
        if not exec_id:
            return self.init
        try:
            return self.execs[exec_id]
        except KeyError:
            raise not_found(f"process does not exist {exec_id}") from None

    def add_exec(self, req: shim_pb2.ExecProcessRequest) -> ExecProcess:
        if req.exec_id in self.execs:
            raise TtrpcError(Code.ALREADY_EXISTS, f"id {req.exec_id}: already exists")
        validate_id("exec id", req.exec_id)
        if len(self.execs) >= MAX_EXECS_PER_CONTAINER:
            raise TtrpcError(
                Code.RESOURCE_EXHAUSTED,
                f"container {self.id}: too many execs ({len(self.execs)}, at most "
                f"{MAX_EXECS_PER_CONTAINER}); delete finished execs first",
            )
        if not req.HasField("spec") or not req.spec.value:
            raise TtrpcError(Code.INVALID_ARGUMENT, "exec process spec is required")
        try:
            spec = json.loads(req.spec.value)
            if not isinstance(spec, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"invalid exec process spec: {exc}") from exc
        self.init.check_exec_allowed()
        spec["terminal"] = req.terminal
        stdio = StdioStrings(req.stdin, req.stdout, req.stderr, req.terminal)
        exec_ = self._new_exec(req.exec_id, stdio, json.dumps(spec).encode())
        self.execs[req.exec_id] = exec_
        self._toolkit.events.publish(
            "/tasks/exec-added",
            events_pb2.TaskExecAdded(container_id=self.id, exec_id=req.exec_id),
        )
        return exec_

    def _new_exec(self, exec_id: str, stdio: StdioStrings, process_json: bytes) -> ExecProcess:
        toolkit = self._toolkit

        async def open_io(p: ExecProcess) -> ProcessIOLike:
            return await toolkit.open_io(p.stdio, p.exec_id, self.options)

        return ExecProcess(
            container_id=self.id,
            exec_id=exec_id,
            bundle=self.bundle,
            stdio=stdio,
            runtime=self.runtime,
            events=toolkit.events,
            router=toolkit.router,
            exits=self.exits,
            process_json=process_json,
            init=self.init,
            open_io=open_io,
        )

    async def delete_exec(self, exec_id: str) -> ExecProcess:
        exec_ = self.process(exec_id)
        assert isinstance(exec_, ExecProcess)
        await exec_.delete()
        self.execs.pop(exec_id, None)
        return exec_

    async def _wait_execs(self) -> None:
        await asyncio.gather(*(e.settled() for e in list(self.execs.values())))
        # Runs before the init's exit is published: an OOM kill that caused the exit
        # must reach containerd first (CRI derives the OOMKilled reason from it).
        self._flush_oom()

    def _flush_oom(self) -> None:
        # Also called the moment the init is reaped: under runc's systemd driver the
        # container's scope, memory.events with it, goes once systemd sees it empty.
        if self._toolkit.oom is not None:
            self._toolkit.oom.flush(self.id)

    # -- cgroup -----------------------------------------------------------------------

    def watch_oom(self) -> None:
        """Once the init is created: its cgroup exists from then on."""
        if self.cgroup is not None and self._toolkit.oom is not None:
            self._toolkit.oom.watch(self.id, self.cgroup)

    def unwatch_oom(self) -> None:
        if self._toolkit.oom is not None:
            self._toolkit.oom.unwatch(self.id)

    def stats(self) -> any_pb2.Any:
        if self.cgroup is None:
            raise not_found("cgroup does not exist")
        from shim.task.stats import CgroupGoneError, collect

        try:
            return collect(self.cgroup)
        except CgroupGoneError:
            raise not_found("cgroup does not exist") from None
        except (OSError, ValueError) as exc:
            raise unknown(f"failed to read cgroup stats: {exc}") from exc

    async def pids(self) -> list[tuple[int, str]]:
        """(pid, exec id or "") for every process runc reports in the container."""
        try:
            pids = await self.runtime.ps(self.id)
        except RuntimeFailure as exc:
            raise unknown(f"failed to list pids: {exc.message}") from exc
        by_pid = {e.pid: e.exec_id for e in self.execs.values() if e.pid}
        return [(pid, by_pid.get(pid, "")) for pid in pids]

    # -- delete -----------------------------------------------------------------------

    async def delete(self) -> None:
        """Delete the init (created or stopped) and everything the container holds."""
        await self.init.delete()
        self._unwatch_orphan()
        self.unwatch_oom()
        for exec_ in list(self.execs.values()):
            with contextlib.suppress(TtrpcError):
                await exec_.delete()
        self.execs.clear()
        if self.rootfs_mounted:
            try:
                self._toolkit.unmount(self.rootfs)
            except OSError as exc:
                raise unknown(f"failed rootfs umount: {exc}") from exc
        # The init's record stays for `delete`; nothing records an exit any more.
        self.exits.close()
        self._toolkit.events.publish(
            "/tasks/delete",
            events_pb2.TaskDelete(
                container_id=self.id,
                pid=self.init.pid,
                exit_status=self.init.exit_status,
                exited_at=self.init.exited_at(),
            ),
        )
