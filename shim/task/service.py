"""The task service: containerd's 17 task RPCs as plain async methods.

Deliberately thin: look the container/process up, delegate to it, shape the answer.
Processes own their state and locking; no transport lives here (``register`` is the
only ttrpc-aware part), so every method is tested by calling it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from protocol.proto import anyutil
from protocol.proto.runc import options_pb2
from protocol.proto.task.v2 import shim_pb2
from protocol.proto.types import mount_pb2
from protocol.proto.types import task_pb2 as types_pb2
from protocol.ttrpc.status import Code, TtrpcError
from shim.sys import ksm
from shim.task.container import Container, CreateOptions, OomWatch, Toolkit, validate_bundle
from shim.task.exits import ExitRouter
from shim.task.ids import validate_id
from shim.task.process import (
    DurableEventSink,
    EventSink,
    ExecProcess,
    InitProcess,
    ProcessIOLike,
    SignalChild,
    StdioStrings,
    signal_own_child,
)
from shim.task.runtime import RuncOptions, Runtime

if TYPE_CHECKING:
    from protocol.ttrpc.server import Method, RequestContext, Server
    from shim.reaper import Reaper
    from shim.task.oom import OomWatcher
    from shim.task.stats import Cgroup

__all__ = ["SERVICE_NAMES", "TaskService"]

log = logging.getLogger(__name__)

SERVICE_NAMES = ("containerd.task.v2.Task", "containerd.task.v3.Task")

Empty = empty_pb2.Empty

# After the last container is deleted, how long to wait for Shutdown before leaving.
EMPTY_SHUTDOWN_GRACE = 5.0
# After start-up, how long to wait for a first Create (or a recovered container).
START_SHUTDOWN_GRACE = 10.0


class TaskService:
    def __init__(
        self,
        *,
        namespace: str,
        publisher: EventSink,
        reaper: Reaper,
        request_shutdown: Callable[[], None],
        make_runtime: Callable[[RuncOptions, str], Runtime] | None = None,
        open_io: Callable[[StdioStrings, str, CreateOptions], Awaitable[ProcessIOLike]]
        | None = None,
        mount: Callable[[Sequence[mount_pb2.Mount], str], None] | None = None,
        unmount: Callable[[str], None] | None = None,
        find_cgroup: Callable[[int], Cgroup | None] | None = None,
        oom: OomWatch | None = None,
        signal_child: SignalChild | None = None,
        empty_grace: float = EMPTY_SHUTDOWN_GRACE,
        start_grace: float = START_SHUTDOWN_GRACE,
    ) -> None:
        self._namespace = namespace
        self._request_shutdown = request_shutdown
        self._durable = publisher if isinstance(publisher, DurableEventSink) else None
        self._empty_grace = empty_grace
        self._empty_timer: asyncio.TimerHandle | None = None
        self._router = ExitRouter()
        self._unsubscribe = reaper.subscribe(self._router.on_reaped)
        real_runtime = make_runtime is None
        if oom is None and real_runtime:
            oom = _LazyOomWatcher(publisher)
        self._oom = oom
        self._toolkit = Toolkit(
            namespace=namespace,
            events=publisher,
            router=self._router,
            make_runtime=make_runtime or _runc_factory(reaper, namespace),
            open_io=open_io or _stdio_opener(reaper, namespace),
            mount=mount or _mount_all,
            unmount=unmount or _unmount_all,
            # Only real runc's pids are processes whose cgroup means anything.
            find_cgroup=find_cgroup or (_find_cgroup if real_runtime else _no_cgroup),
            oom=oom,
            pidfd_open=_pidfd_open if real_runtime else _no_pidfd,
            signal_child=signal_child or (signal_own_child if real_runtime else None),
        )
        self._containers: dict[str, Container] = {}
        # Ids whose Create is in flight: a second Create must see them as taken.
        self._creating: set[str] = set()
        self._create_done: dict[str, asyncio.Event] = {}
        # A shim whose daemon died between `start` and Create is never sent Create (nor
        # Shutdown) by a restarted containerd 1.6, which reconnects and forgets it.
        with contextlib.suppress(RuntimeError):  # no running loop: nobody to time us
            self._arm_empty_timer(start_grace)

    def register(self, server: Server) -> None:
        from protocol.ttrpc.server import Method

        methods: dict[str, Method[Any, Any]] = {
            name: Method(request_type, _adapt(handler))
            for name, (request_type, handler) in self._handlers().items()
        }
        for service in SERVICE_NAMES:
            server.register(service, methods)

    def _handlers(self) -> dict[str, tuple[type[Message], Callable[[Any], Awaitable[Message]]]]:
        return {
            "State": (shim_pb2.StateRequest, self.state),
            "Create": (shim_pb2.CreateTaskRequest, self.create),
            "Start": (shim_pb2.StartRequest, self.start),
            "Delete": (shim_pb2.DeleteRequest, self.delete),
            "Pids": (shim_pb2.PidsRequest, self.pids),
            "Pause": (shim_pb2.PauseRequest, self.pause),
            "Resume": (shim_pb2.ResumeRequest, self.resume),
            "Checkpoint": (shim_pb2.CheckpointTaskRequest, self.checkpoint),
            "Kill": (shim_pb2.KillRequest, self.kill),
            "Exec": (shim_pb2.ExecProcessRequest, self.exec),
            "ResizePty": (shim_pb2.ResizePtyRequest, self.resize_pty),
            "CloseIO": (shim_pb2.CloseIORequest, self.close_io),
            "Update": (shim_pb2.UpdateTaskRequest, self.update),
            "Wait": (shim_pb2.WaitRequest, self.wait),
            "Stats": (shim_pb2.StatsRequest, self.stats),
            "Connect": (shim_pb2.ConnectRequest, self.connect),
            "Shutdown": (shim_pb2.ShutdownRequest, self.shutdown),
        }

    def close(self) -> None:
        self._unsubscribe()
        if isinstance(self._oom, _LazyOomWatcher):
            self._oom.close()

    @property
    def container_ids(self) -> list[str]:
        return list(self._containers)

    # -- lookups --------------------------------------------------------------------

    def _container(self, id: str) -> Container:
        try:
            return self._containers[id]
        except KeyError:
            raise TtrpcError(Code.NOT_FOUND, "container not created: not found") from None

    def _process(self, id: str, exec_id: str) -> InitProcess | ExecProcess:
        return self._container(id).process(exec_id)

    # -- recovery ---------------------------------------------------------------------

    async def recover(self, bundle: str) -> bool:
        """Pick up a container an earlier shim created in ``bundle``; False if none."""
        container = await Container.recover(bundle, self._toolkit)
        if container is None or container.id in self._containers:
            return False
        self._containers[container.id] = container
        if self._durable is not None:
            self._durable.attach(container.id, container.bundle)
        return True

    # -- RPCs -------------------------------------------------------------------------

    async def create(self, req: shim_pb2.CreateTaskRequest) -> shim_pb2.CreateTaskResponse:
        validate_id("container id", req.id)
        if req.id in self._containers or req.id in self._creating:
            raise TtrpcError(Code.ALREADY_EXISTS, f"container {req.id}: already exists")
        validate_bundle(req.bundle)
        self._creating.add(req.id)
        created = self._create_done[req.id] = asyncio.Event()
        self._cancel_empty_timer()
        # Before Create: its /tasks/create event already goes through the outbox.
        if self._durable is not None:
            self._durable.attach(req.id, req.bundle)
        try:
            container = await Container.create(req, self._toolkit)
            self._containers[req.id] = container
        except BaseException:
            if self._durable is not None:
                self._durable.detach(req.id)
            raise
        finally:
            self._creating.discard(req.id)
            del self._create_done[req.id]
            created.set()
            # A failed Create (its caller may be gone too) must not leave us waiting
            # for a Shutdown that never comes.
            self._arm_empty_timer()
        return shim_pb2.CreateTaskResponse(pid=container.init.pid)

    async def start(self, req: shim_pb2.StartRequest) -> shim_pb2.StartResponse:
        container = self._container(req.id)
        pid = await container.process(req.exec_id).start()
        if not req.exec_id:
            # Runs once this reply is written (the server writes it in this task step).
            asyncio.get_running_loop().call_soon(ksm.started)
        return shim_pb2.StartResponse(pid=pid)

    async def state(self, req: shim_pb2.StateRequest) -> shim_pb2.StateResponse:
        container = self._container(req.id)
        p = container.process(req.exec_id)
        return shim_pb2.StateResponse(
            id=p.id,
            bundle=container.bundle,
            pid=p.pid,
            status=p.status,
            stdin=p.stdio.stdin,
            stdout=p.stdio.stdout,
            stderr=p.stdio.stderr,
            terminal=p.stdio.terminal,
            exit_status=p.exit_status,
            exited_at=p.exited_at(),
            exec_id=p.exec_id,
        )

    async def wait(self, req: shim_pb2.WaitRequest) -> shim_pb2.WaitResponse:
        p = self._process(req.id, req.exec_id)
        await p.wait()
        return shim_pb2.WaitResponse(exit_status=p.exit_status, exited_at=p.exited_at())

    async def kill(self, req: shim_pb2.KillRequest) -> Empty:
        p = self._process(req.id, req.exec_id)
        if isinstance(p, InitProcess):
            await p.kill(req.signal, req.all)
        else:
            await p.kill(req.signal)
        return Empty()

    async def delete(self, req: shim_pb2.DeleteRequest) -> shim_pb2.DeleteResponse:
        creating = self._create_done.get(req.id)
        if creating is not None and not req.exec_id:
            # containerd gave up on a Create still in flight (its client went away) and
            # cleans up: answering NotFound now would leave the container it is about
            # to get behind, in a shim nobody will ever talk to again.
            await creating.wait()
        container = self._container(req.id)
        if req.exec_id:
            p: InitProcess | ExecProcess = await container.delete_exec(req.exec_id)
        else:
            await container.delete()
            self._containers.pop(req.id, None)
            if self._durable is not None:
                self._durable.detach(req.id)
            self._arm_empty_timer()
            p = container.init
        return shim_pb2.DeleteResponse(
            pid=p.pid, exit_status=p.exit_status, exited_at=p.exited_at()
        )

    async def pids(self, req: shim_pb2.PidsRequest) -> shim_pb2.PidsResponse:
        infos = []
        for pid, exec_id in await self._container(req.id).pids():
            info = types_pb2.ProcessInfo(pid=pid)
            if exec_id:
                info.info.CopyFrom(anyutil.pack(options_pb2.ProcessDetails(exec_id=exec_id)))
            infos.append(info)
        return shim_pb2.PidsResponse(processes=infos)

    async def pause(self, req: shim_pb2.PauseRequest) -> Empty:
        await self._container(req.id).init.pause()
        return Empty()

    async def resume(self, req: shim_pb2.ResumeRequest) -> Empty:
        await self._container(req.id).init.resume()
        return Empty()

    async def checkpoint(self, req: shim_pb2.CheckpointTaskRequest) -> Empty:
        from shim.task.checkpoint import decode_checkpoint_request

        container = self._container(req.id)
        await container.init.checkpoint(decode_checkpoint_request(req))
        return Empty()

    async def stats(self, req: shim_pb2.StatsRequest) -> shim_pb2.StatsResponse:
        return shim_pb2.StatsResponse(stats=self._container(req.id).stats())

    async def exec(self, req: shim_pb2.ExecProcessRequest) -> Empty:
        self._container(req.id).add_exec(req)
        return Empty()

    async def resize_pty(self, req: shim_pb2.ResizePtyRequest) -> Empty:
        # struct winsize holds 16-bit fields; the reference truncates.
        self._process(req.id, req.exec_id).resize(req.width & 0xFFFF, req.height & 0xFFFF)
        return Empty()

    async def close_io(self, req: shim_pb2.CloseIORequest) -> Empty:
        self._process(req.id, req.exec_id).close_stdin()
        return Empty()

    async def update(self, req: shim_pb2.UpdateTaskRequest) -> Empty:
        container = self._container(req.id)
        if not req.HasField("resources"):
            raise TtrpcError(Code.INVALID_ARGUMENT, "update: resources are required")
        await container.init.update(req.resources.value)
        return Empty()

    async def connect(self, req: shim_pb2.ConnectRequest) -> shim_pb2.ConnectResponse:
        container = self._containers.get(req.id)
        return shim_pb2.ConnectResponse(
            shim_pid=os.getpid(), task_pid=container.init.pid if container else 0
        )

    async def shutdown(self, req: shim_pb2.ShutdownRequest) -> Empty:
        if not self._containers and not self._creating:
            self._request_shutdown()
        return Empty()

    # -- a shim nobody shuts down -------------------------------------------------------

    def _arm_empty_timer(self, grace: float | None = None) -> None:
        # containerd sends Shutdown right after the last Delete; if it died in between,
        # containerd 1.6 reconnects to us on restart but never asks again, and the
        # manager does the same. An empty shim that stays empty is of no use to anyone.
        grace = self._empty_grace if grace is None else grace
        if self._containers or self._creating or grace <= 0:
            return
        loop = asyncio.get_running_loop()
        self._cancel_empty_timer()
        self._empty_timer = loop.call_later(grace, self._empty_timeout)

    def _cancel_empty_timer(self) -> None:
        if self._empty_timer is not None:
            self._empty_timer.cancel()
            self._empty_timer = None

    def _empty_timeout(self) -> None:
        self._empty_timer = None
        if not self._containers and not self._creating:
            log.warning("no container and no Shutdown: exiting")
            self._request_shutdown()


def _adapt(
    handler: Callable[[Any], Awaitable[Message]],
) -> Callable[[RequestContext, Any], Awaitable[Message]]:
    async def call(ctx: RequestContext, req: Any) -> Message:
        return await handler(req)

    return call


# -- production collaborators (imported lazily: tests replace them) ---------------------


def _runc_factory(reaper: Reaper, namespace: str) -> Callable[[RuncOptions, str], Runtime]:
    def make(options: RuncOptions, bundle: str) -> Runtime:
        from shim.task.runtime import Runc

        return Runc(reaper, options, namespace, bundle)

    return make


def _stdio_opener(
    reaper: Reaper, namespace: str
) -> Callable[[StdioStrings, str, CreateOptions], Awaitable[ProcessIOLike]]:
    async def open_io(
        stdio: StdioStrings, process_id: str, options: CreateOptions
    ) -> ProcessIOLike:
        from shim.io.stdio import StdioSpec, open_process_io

        spec = StdioSpec(
            stdin=stdio.stdin, stdout=stdio.stdout, stderr=stdio.stderr, terminal=stdio.terminal
        )
        return await open_process_io(
            spec,
            process_id=process_id,
            namespace=namespace,
            reaper=reaper,
            io_uid=options.io_uid,
            io_gid=options.io_gid,
        )

    return open_io


def _mount_all(mounts: Sequence[mount_pb2.Mount], target: str) -> None:
    from shim.task.mount import mount_all

    mount_all(mounts, target)


def _unmount_all(target: str) -> None:
    from shim.task.mount import unmount_all

    unmount_all(target)


def _find_cgroup(pid: int) -> Cgroup | None:
    from shim.task.stats import find_cgroup

    return find_cgroup(pid)


def _no_cgroup(pid: int) -> Cgroup | None:
    return None


def _pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def _no_pidfd(pid: int) -> int | None:
    return None


class _LazyOomWatcher:
    """Creates the real watcher (and imports it) on the first container created."""

    def __init__(self, events: EventSink) -> None:
        self._events = events
        self._watcher: OomWatcher | None = None

    def watch(self, container_id: str, cgroup: Cgroup) -> None:
        if self._watcher is None:
            from shim.task.oom import OomWatcher

            self._watcher = OomWatcher(self._events)
        self._watcher.watch(container_id, cgroup)

    def flush(self, container_id: str) -> None:
        if self._watcher is not None:
            self._watcher.flush(container_id)

    def unwatch(self, container_id: str) -> None:
        if self._watcher is not None:
            self._watcher.unwatch(container_id)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
