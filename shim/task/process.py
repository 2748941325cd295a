"""The init and exec processes of a container, each driven by explicit state objects.

A state object answers every operation: it either names the state the process moves
to, or raises the exact error containerd expects for that illegal transition. The
process performs the side effects (runc, IO, events) around that decision, so an
operation that is illegal in a state cannot be written by accident.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from signal import NSIG
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from protocol.proto.events import task_pb2 as events_pb2
from protocol.proto.timeutil import go_zero_time, timestamp_from_ns
from protocol.proto.types import task_pb2 as types_pb2
from protocol.ttrpc.status import Code, TtrpcError
from shim.records.state import ExitLog, ExitRecord
from shim.sys.procfs import stat_fields
from shim.task.exits import Exit, ExitRouter
from shim.task.runtime import Runtime, RuntimeFailure

if TYPE_CHECKING:
    from shim.task.checkpoint import CheckpointConfig, RestoreConfig

__all__ = [
    "DRAIN_TIMEOUT",
    "DurableEventSink",
    "EventSink",
    "ExecProcess",
    "InitProcess",
    "Process",
    "ProcessIOLike",
    "SignalChild",
    "StdioStrings",
    "signal_own_child",
]

log = logging.getLogger(__name__)

# Output written right before an exit must reach the client, but a grandchild holding
# stdout open must not stall the exit forever: the reference uses the same bound.
DRAIN_TIMEOUT = 2.0


class EventSink(Protocol):
    def publish(self, topic: str, event: Message) -> None: ...


# (pid, signal) -> True when sent; False when the caller must ask the runtime instead;
# ProcessLookupError when the child already died (see signal_own_child).
SignalChild = Callable[[int, int], bool]


@runtime_checkable
class DurableEventSink(EventSink, Protocol):
    """A sink that keeps a container's undelivered events in its bundle (shim.events)."""

    def attach(self, container_id: str, bundle: str) -> int: ...
    def detach(self, container_id: str) -> None: ...


class ProcessIOLike(Protocol):
    """What a process needs of ``shim.io.stdio.ProcessIO``."""

    console_socket: str | None

    def runtime_stdio(self) -> tuple[int | None, int | None, int | None]: ...
    async def started(self) -> None: ...
    def resize(self, width: int, height: int) -> None: ...
    def close_stdin(self) -> None: ...
    async def drain(self, timeout: float) -> None: ...
    async def close(self) -> None: ...


@dataclass(frozen=True)
class StdioStrings:
    """The stdio spec exactly as the client sent it (State echoes it back)."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


def unknown(message: str) -> TtrpcError:
    # The reference returns most state errors as plain errors, which arrive as code 2.
    return TtrpcError(Code.UNKNOWN, message)


def not_found(message: str) -> TtrpcError:
    return TtrpcError(Code.NOT_FOUND, f"{message}: not found")


def precondition(message: str) -> TtrpcError:
    return TtrpcError(Code.FAILED_PRECONDITION, f"{message}: failed precondition")


def _check_resources(resources_json: bytes) -> None:
    # The reference decodes the resources before it runs runc: bad input is refused
    # with the decoder's own message, and runc (which would fail later, with its
    # message buried in "runc did not terminate successfully") never sees it.
    try:
        resources = json.loads(resources_json)
    except ValueError as exc:
        raise TtrpcError(
            Code.INVALID_ARGUMENT, f"update: resources are not valid JSON: {exc}"
        ) from None
    if not isinstance(resources, dict):
        raise TtrpcError(
            Code.INVALID_ARGUMENT,
            f"update: resources must be a JSON object (LinuxResources), not {resources!r:.40}",
        )


# --------------------------------------------------------------------------- states


class _State:
    status: ClassVar[types_pb2.Status]
    name: ClassVar[str]

    def start(self) -> _State:
        raise unknown(f"cannot start a {self.name} process")

    def delete(self) -> _State:
        raise unknown(f"cannot delete a {self.name} process")

    def exited(self) -> _State | None:
        """The state after the process died; None when the exit is no longer ours."""
        return STOPPED


class _Created(_State):
    status = types_pb2.CREATED
    name = "created"

    def start(self) -> _State:
        return RUNNING

    def delete(self) -> _State:
        return DELETED


class _CreatedCheckpoint(_Created):
    """Created from a checkpoint: nothing runs until Start restores it. Its own
    instance, so the operations that differ (pause, resume, checkpoint) can tell it
    from CREATED by identity."""


class _Running(_State):
    status = types_pb2.RUNNING
    name = "running"


class _Paused(_State):
    status = types_pb2.PAUSED
    name = "paused"


class _Stopped(_State):
    status = types_pb2.STOPPED
    name = "stopped"

    def delete(self) -> _State:
        return DELETED


class _Deleted(_State):
    # The reference reports a deleted process as STOPPED.
    status = types_pb2.STOPPED
    name = "deleted"

    def delete(self) -> _State:
        raise not_found("cannot delete a deleted process")

    def exited(self) -> _State | None:
        return None


CREATED = _Created()
CREATED_CHECKPOINT = _CreatedCheckpoint()
RUNNING = _Running()
PAUSED = _Paused()
STOPPED = _Stopped()
DELETED = _Deleted()


def _check_pause(state: _State) -> _State:
    if state is RUNNING:
        return PAUSED
    raise unknown(
        {
            CREATED: "cannot pause task in created state",
            CREATED_CHECKPOINT: "cannot pause task in created state",
            PAUSED: "cannot pause a paused container",
            STOPPED: "cannot pause a stopped container",
        }.get(state, "cannot pause a deleted process")
    )


def _check_resume(state: _State) -> _State:
    if state is PAUSED:
        return RUNNING
    raise unknown(
        {
            CREATED: "cannot resume task in created state",
            CREATED_CHECKPOINT: "cannot resume task in created state",
            RUNNING: "cannot resume a running process",
            STOPPED: "cannot resume a stopped container",
        }.get(state, "cannot resume a deleted process")
    )


def _check_update(state: _State) -> None:
    if state is STOPPED:
        raise unknown("cannot update a stopped container")
    if state is DELETED:
        raise unknown("cannot update a deleted process")


def _check_checkpoint(state: _State) -> None:
    if state is RUNNING or state is PAUSED:
        return
    raise unknown(
        {
            CREATED: "cannot checkpoint a task in created state",
            CREATED_CHECKPOINT: "cannot checkpoint a task in created state",
            STOPPED: "cannot checkpoint a stopped container",
        }.get(state, "cannot checkpoint a deleted process")
    )


def _check_exec(state: _State) -> None:
    if state in (CREATED, RUNNING):
        return
    raise unknown(f"cannot exec in a {state.name} state")


# --------------------------------------------------------------------------- processes


class Process:
    """What init and exec share: identity, IO, exit recording and waiters."""

    def __init__(
        self,
        *,
        container_id: str,
        exec_id: str,
        bundle: str,
        stdio: StdioStrings,
        runtime: Runtime,
        events: EventSink,
        router: ExitRouter,
        exits: ExitLog,
    ) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.bundle = bundle
        self.stdio = stdio
        self.pid = 0
        self.exit_status = 0
        self.exited_at_ns: int | None = None
        self.io: ProcessIOLike | None = None
        self._runtime = runtime
        self._events = events
        self._router = router
        self._exits = exits
        self._state: _State = CREATED
        self._lock = asyncio.Lock()
        self._done = asyncio.Event()
        self._start_in_flight = False
        self._held_exit: Exit | None = None
        self._exit_task: asyncio.Task[None] | None = None
        self._reaped = False

    @property
    def id(self) -> str:
        return self.exec_id or self.container_id

    @property
    def state_name(self) -> str:
        return self._state.name

    @property
    def status(self) -> types_pb2.Status:
        return self._state.status

    @property
    def has_exited(self) -> bool:
        """Reaped, even if the exit is still being recorded or held back."""
        return self._reaped or self._state is STOPPED

    def exited_at(self) -> timestamp_pb2.Timestamp:
        if self.exited_at_ns is None:
            return go_zero_time()
        return timestamp_from_ns(self.exited_at_ns)

    async def wait(self) -> None:
        await self._done.wait()

    # -- exits --------------------------------------------------------------------

    def reaped(self, exit: Exit) -> None:
        """ExitTarget: the reaper collected our pid."""
        self._reaped = True
        if self._start_in_flight:
            # The start event of this process must be queued before its exit event.
            self._held_exit = exit
            return
        self._handle_exit_soon(exit)

    def _handle_exit_soon(self, exit: Exit) -> None:
        if self._exit_task is None:
            self._exit_task = asyncio.get_running_loop().create_task(self._on_exit(exit))

    def _release_held_exit(self) -> None:
        held, self._held_exit = self._held_exit, None
        if held is not None:
            self._handle_exit_soon(held)

    async def _before_exit_recorded(self) -> None:
        """Hook: init kills the rest of the container and waits for its execs."""

    async def _on_exit(self, exit: Exit) -> None:
        try:
            await self._before_exit_recorded()
            if self.io is not None:
                await self.io.drain(DRAIN_TIMEOUT)
        except Exception:
            log.exception("exit handling of %s (pid %d) failed", self.id, exit.pid)
        next_state = self._state.exited()
        if next_state is None:
            self._done.set()
            return
        self.exit_status = exit.status
        self.exited_at_ns = exit.at_ns
        self._persist_exit()
        self._state = next_state
        self._events.publish(
            "/tasks/exit",
            events_pb2.TaskExit(
                container_id=self.container_id,
                id=self.id,
                pid=exit.pid,
                exit_status=exit.status,
                exited_at=self.exited_at(),
            ),
        )
        self._done.set()

    def _persist_exit(self) -> None:
        assert self.exited_at_ns is not None
        record = ExitRecord(
            container_id=self.container_id,
            exec_id=self.exec_id,
            pid=self.pid,
            exit_status=self.exit_status,
            exited_at_ns=self.exited_at_ns,
        )
        try:
            self._exits.record(record)
        except OSError:
            # Still publish: losing the event too would be worse than losing the record.
            log.exception("cannot persist the exit of %s", self.id)

    def restore_exit(self, record: ExitRecord) -> None:
        """Recovery: the exit was recorded by an earlier shim."""
        self.pid = record.pid
        self.exit_status = record.exit_status
        self.exited_at_ns = record.exited_at_ns
        self._state = STOPPED
        self._done.set()

    # -- shared operations --------------------------------------------------------

    def close_stdin(self) -> None:
        if self.io is not None:
            self.io.close_stdin()

    async def _close_io(self) -> None:
        if self.io is not None:
            with contextlib.suppress(Exception):
                await self.io.drain(DRAIN_TIMEOUT)
            await self.io.close()

    def _forget(self) -> None:
        if self.pid:
            self._router.unregister(self.pid, self)
        if self._exit_task is None:
            # Nobody will record an exit any more; Wait must not hang on a deleted process.
            self._done.set()


class InitProcess(Process):
    def __init__(
        self,
        *,
        container_id: str,
        bundle: str,
        stdio: StdioStrings,
        runtime: Runtime,
        events: EventSink,
        router: ExitRouter,
        exits: ExitLog,
        kill_all_on_exit: bool,
        wait_execs: Callable[[], Awaitable[None]],
        signal_child: SignalChild | None = None,
        on_restored: Callable[[int], None] | None = None,
        on_reaped: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            container_id=container_id,
            exec_id="",
            bundle=bundle,
            stdio=stdio,
            runtime=runtime,
            events=events,
            router=router,
            exits=exits,
        )
        self._kill_all_on_exit = kill_all_on_exit
        self._wait_execs = wait_execs
        self._on_reaped = on_reaped
        self._pausing = False
        self._signal_child = signal_child
        # Set when this shim's `runc create` made the init, so it is our child: a
        # recovered init was an earlier shim's child, and its pid may have been reused.
        self._own_child = False
        # Created from a checkpoint: what Start restores, and who learns the new pid.
        self._restore: RestoreConfig | None = None
        self._on_restored = on_restored

    @property
    def status(self) -> types_pb2.Status:
        if self._pausing:
            return types_pb2.PAUSING
        return self._state.status

    def created(self, pid: int, io: ProcessIOLike | None) -> None:
        self.pid = pid
        self.io = io
        self._own_child = True

    def created_from_checkpoint(self, io: ProcessIOLike, restore: RestoreConfig) -> None:
        """Create with a checkpoint: the IO is ready, runc runs only at Start."""
        self.io = io
        self._restore = restore
        self._state = CREATED_CHECKPOINT

    def restore(self, pid: int, status: str) -> None:
        """Recovery of a live init from what runc reports."""
        self.pid = pid
        self._state = {"created": CREATED, "paused": PAUSED}.get(status, RUNNING)

    async def start(self) -> int:
        async with self._lock:
            next_state = self._state.start()
            self._start_in_flight = True
            try:
                if self._state is CREATED_CHECKPOINT:
                    await self._restore_checkpoint()
                else:
                    try:
                        await self._runtime.start(self.container_id)
                    except RuntimeFailure as exc:
                        raise unknown(f"OCI runtime start failed: {exc.message}") from exc
                self._state = next_state
                self._events.publish(
                    "/tasks/start",
                    events_pb2.TaskStart(container_id=self.container_id, pid=self.pid),
                )
            finally:
                self._start_in_flight = False
                self._release_held_exit()
            return self.pid

    async def _restore_checkpoint(self) -> None:
        from shim.task.checkpoint import restore_args

        restore, io = self._restore, self.io
        assert restore is not None and io is not None
        args = restore_args(restore, console_socket=io.console_socket, bundle=self.bundle)
        with self._router.window() as window:
            try:
                await self._runtime.restore(self.container_id, args, stdio=io.runtime_stdio())
            except RuntimeFailure as exc:
                raise unknown(f"OCI runtime restore failed: {exc.message}") from exc
            await io.started()
            pid = _read_pid_file(Path(restore.pid_file))
            self.pid = pid
            # runc detached: the restored init is re-parented to us, the subreaper.
            self._own_child = True
            self._restore = None
            if self._on_restored is not None:
                self._on_restored(pid)
            early = self._router.register(pid, self, window)
        if early is not None:
            # Held by reaped() until /tasks/start is out (a Start is in flight).
            self.reaped(early)

    async def checkpoint(self, config: CheckpointConfig) -> None:
        from shim.task.checkpoint import (
            checkpoint_args,
            checkpoint_failure,
            default_work_path,
            remove_default_work,
        )

        async with self._lock:
            _check_checkpoint(self._state)
            work = config.work_path or default_work_path(self.bundle)
            try:
                await self._runtime.checkpoint(self.container_id, checkpoint_args(config, work))
            except RuntimeFailure as exc:
                raise checkpoint_failure(exc.message, bundle=self.bundle, work_path=work) from exc
            finally:
                if not config.work_path:
                    remove_default_work(work)
            # With exit the init dies now, and its exit is handled like any other.
            self._events.publish(
                "/tasks/checkpointed",
                events_pb2.TaskCheckpointed(container_id=self.container_id, checkpoint=config.path),
            )

    async def kill(self, signal: int, all: bool) -> None:
        if self._state is DELETED:
            raise not_found("cannot kill a deleted process")
        if not all and self.has_exited:
            # What `runc kill` answers once the init is dead ("container not running"),
            # without the run of runc: CRI's SIGKILL after a stop timeout lands here while
            # containerd deletes the task, and containerd 1.7 closes its connection the
            # moment Delete answers, failing a Kill that is still waiting on runc.
            raise not_found("process already finished")
        signal_child = self._signal_child
        if signal_child is not None and not all and self._may_signal_directly():
            try:
                if signal_child(self.pid, signal):
                    return
            except ProcessLookupError as exc:
                # What `runc kill` answers for a dead init ("container not running").
                raise not_found("process already finished") from exc
        try:
            await self._runtime.kill(self.container_id, signal, all)
        except RuntimeFailure as exc:
            raise _kill_error(exc.message) from exc

    def _may_signal_directly(self) -> bool:
        """Whether a signal to the init alone may skip `runc kill` (a Go binary run).

        runc 1.1's kill without --all checks the container's status and signals the
        init's pid. While the init is our child and we have not reaped it, its pid
        cannot be reused, so os.kill is the same. A paused (or pausing) container
        stays with runc: for a frozen cgroup v1 it thaws the cgroup after SIGKILL.
        """
        return (
            self._own_child
            and not self._reaped
            and not self._pausing
            and self.pid > 0
            and (self._state is CREATED or self._state is RUNNING)
        )

    async def pause(self) -> None:
        async with self._lock:
            next_state = _check_pause(self._state)
            self._pausing = True
            try:
                await self._runtime.pause(self.container_id)
            except RuntimeFailure as exc:
                raise unknown(f"OCI runtime pause failed: {exc.message}") from exc
            finally:
                self._pausing = False
            if self._state is RUNNING:
                self._state = next_state
            self._events.publish(
                "/tasks/paused", events_pb2.TaskPaused(container_id=self.container_id)
            )

    async def resume(self) -> None:
        async with self._lock:
            next_state = _check_resume(self._state)
            try:
                await self._runtime.resume(self.container_id)
            except RuntimeFailure as exc:
                raise unknown(f"OCI runtime resume failed: {exc.message}") from exc
            if self._state is PAUSED:
                self._state = next_state
            self._events.publish(
                "/tasks/resumed", events_pb2.TaskResumed(container_id=self.container_id)
            )

    async def update(self, resources_json: bytes) -> None:
        async with self._lock:
            _check_update(self._state)
            _check_resources(resources_json)
            try:
                await self._runtime.update(self.container_id, resources_json)
            except RuntimeFailure as exc:
                raise unknown(f"OCI runtime update failed: {exc.message}") from exc

    def check_exec_allowed(self) -> None:
        _check_exec(self._state)

    def check_running_for_exec(self) -> None:
        """1.7+: an exec cannot start once the init has died (even if not yet recorded)."""
        if self.has_exited or self._state in (STOPPED, DELETED):
            raise precondition(f"container {self.container_id} init process is not running")

    def resize(self, width: int, height: int) -> None:
        # The reference does not check the init's state before resizing.
        if self.io is not None:
            self.io.resize(width, height)

    async def delete(self) -> None:
        async with self._lock:
            next_state = self._state.delete()
            if self.io is not None:
                with contextlib.suppress(Exception):
                    await self.io.drain(DRAIN_TIMEOUT)
            try:
                await self._runtime.delete(self.container_id)
            except RuntimeFailure as exc:
                if "does not exist" not in exc.message:
                    raise unknown(f"failed to delete task: {exc.message}") from exc
            self._state = next_state
            self._forget()
            if self.io is not None:
                await self.io.close()

    def reaped(self, exit: Exit) -> None:
        if self._on_reaped is not None:
            # At once, before anything awaits: what must be read before the container's
            # cgroup goes (systemd removes a scope as soon as it sees it empty).
            self._on_reaped()
        super().reaped(exit)

    async def _before_exit_recorded(self) -> None:
        if self._kill_all_on_exit:
            # Without a private pid namespace the kernel leaves the rest running.
            try:
                await self._runtime.kill(self.container_id, 9, True)
            except RuntimeFailure as exc:
                log.warning("kill --all after init exit of %s: %s", self.id, exc.message)
        if self._state is PAUSED:
            # A frozen cgroup keeps the killed processes (and our execs) stuck.
            try:
                await self._runtime.resume(self.container_id)
            except RuntimeFailure as exc:
                log.warning("resume after init exit of %s: %s", self.id, exc.message)
        # containerd 1.7+ relies on the init's exit being the container's last one.
        await self._wait_execs()


class ExecProcess(Process):
    def __init__(
        self,
        *,
        container_id: str,
        exec_id: str,
        bundle: str,
        stdio: StdioStrings,
        runtime: Runtime,
        events: EventSink,
        router: ExitRouter,
        exits: ExitLog,
        process_json: bytes,
        init: InitProcess,
        open_io: Callable[[ExecProcess], Awaitable[ProcessIOLike]],
    ) -> None:
        super().__init__(
            container_id=container_id,
            exec_id=exec_id,
            bundle=bundle,
            stdio=stdio,
            runtime=runtime,
            events=events,
            router=router,
            exits=exits,
        )
        self.process_json = process_json
        self._init = init
        self._open_io = open_io

    @property
    def pid_file(self) -> Path:
        return Path(self.bundle) / f"{self.exec_id}.pid"

    @property
    def status(self) -> types_pb2.Status:
        if self._state is RUNNING and self._init.status in (types_pb2.PAUSED, types_pb2.PAUSING):
            return self._init.status
        return self._state.status

    async def settled(self) -> None:
        """Returns once this exec cannot produce an exit any more, or its exit is published."""
        async with self._lock:
            pass  # an in-flight start finishes first
        if self._state is RUNNING or self._exit_task is not None:
            await self._done.wait()

    async def start(self) -> int:
        async with self._lock:
            next_state = self._state.start()
            self._init.check_running_for_exec()
            self._start_in_flight = True
            try:
                with self._router.window() as window:
                    pid = await self._run_exec()
                    self.pid = pid
                    self._state = next_state
                    self._events.publish(
                        "/tasks/exec-started",
                        events_pb2.TaskExecStarted(
                            container_id=self.container_id, exec_id=self.exec_id, pid=pid
                        ),
                    )
                    early = self._router.register(pid, self, window)
                if early is not None:
                    self.reaped(early)
            finally:
                self._start_in_flight = False
                self._release_held_exit()
            return self.pid

    async def _run_exec(self) -> int:
        try:
            self.io = await self._open_io(self)
            await self._runtime.exec(
                self.container_id,
                self.process_json,
                pid_file=str(self.pid_file),
                console_socket=self.io.console_socket,
                stdio=self.io.runtime_stdio(),
            )
            await self.io.started()
            return _read_pid_file(self.pid_file)
        except BaseException as exc:
            # The exec stays created; its waiters are released with status 0.
            if self.io is not None:
                io, self.io = self.io, None
                with contextlib.suppress(Exception):
                    await io.close()
            self._done.set()
            if isinstance(exc, RuntimeFailure):
                raise unknown(f"OCI runtime exec failed: {exc.message}") from exc
            raise

    async def kill(self, signal: int) -> None:
        if self._state is CREATED:
            raise precondition("process not created")
        if self._state is not RUNNING or self._reaped:
            raise not_found("process already finished")
        try:
            os.kill(self.pid, signal)
        except ProcessLookupError as exc:
            raise not_found("process already finished") from exc

    def resize(self, width: int, height: int) -> None:
        if self._state is STOPPED:
            raise unknown("cannot resize a stopped container")
        if self._state is DELETED:
            raise unknown("cannot resize a deleted process")
        if self.io is not None:
            self.io.resize(width, height)

    async def delete(self) -> None:
        async with self._lock:
            next_state = self._state.delete()
            self._state = next_state
            self._forget()
            await self._close_io()
            # The exit record goes too: a restarted shim must not bring a deleted exec
            # back, and a long-lived container must not collect one record per exec.
            self._exits.forget(self.id)
            with contextlib.suppress(FileNotFoundError):
                self.pid_file.unlink()


def _read_pid_file(path: Path) -> int:
    # runc writes the decimal pid without a newline. A bare os.read: this runs between
    # runc's exit and the Start reply, and a text-mode open costs several syscalls more.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = os.read(fd, 64)
    finally:
        os.close(fd)
    text = raw.decode(errors="replace").strip()
    try:
        return int(text)
    except ValueError as exc:
        raise unknown(f"invalid pid file {path}: {text!r}") from exc


def read_pid_file(path: Path) -> int:
    return _read_pid_file(path)


def signal_own_child(pid: int, sig: int) -> bool:
    """Send ``sig`` to ``pid`` if it is a live child of this process.

    Returns False, having sent nothing, when ``pid`` is not our child (the caller then
    lets the runtime, which guards against pid reuse itself, decide) or when ``sig``
    is no signal number (the runtime then reports it in its own words). Raises
    ``ProcessLookupError`` for a child that died and awaits reaping: runc reports such
    a zombie init as not running, and the kernel would accept a signal to it silently.
    The caller must know the pid is not reaped yet; only then is a child ours for sure.
    """
    # os.kill truncates large numbers to a C int (2**40 would become signal 0).
    if not 0 <= sig < NSIG:
        return False
    try:
        fields = stat_fields(pid)
        state, ppid = fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return False
    if ppid != os.getpid():
        return False
    if state in (b"Z", b"X"):
        raise ProcessLookupError(errno.ESRCH, f"process {pid} already finished")
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        raise
    except OSError:
        return False
    return True


def _kill_error(message: str) -> TtrpcError:
    lowered = message.lower()
    if (
        "os: process already finished" in message
        or "container not running" in message
        or "no such process" in lowered
    ):
        return not_found("process already finished")
    if "does not exist" in message:
        return not_found("no such container")
    return unknown(f"unknown error after kill: {message}")
