"""The OCI runtime behind the shim: the ``Runtime`` interface and its runc/crun backend.

Argv, environment and error texts follow io.md §3 exactly, since containerd users see
these messages. Only flags both runc and crun understand are used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from shim.sys.fdio import write_all
from shim.sys.procfs import gone

if TYPE_CHECKING:
    from shim.reaper import Reaper

__all__ = ["Runc", "RuncOptions", "Runtime", "RuntimeFailure", "Stdio"]

_log = logging.getLogger("shim.task.runtime")

Stdio = tuple[int | None, int | None, int | None]

# Enough to hold every line one runc command appends; older lines are not ours.
_LOG_TAIL_LIMIT = 1 << 20


class RuntimeFailure(Exception):
    """A runtime command failed. ``message`` is what users see (without an
    "OCI runtime … failed" prefix, which the caller chooses)."""

    def __init__(self, message: str, *, status: int | None = None, output: bytes = b"") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.output = output


@dataclass(frozen=True)
class RuncOptions:
    binary: str = "runc"
    root: str = "/run/containerd/runc"
    systemd_cgroup: bool = False
    criu_path: str = ""


class Runtime(Protocol):
    async def create(
        self,
        id: str,
        *,
        pid_file: str,
        console_socket: str | None,
        stdio: Stdio,
        no_pivot: bool = False,
        no_new_keyring: bool = False,
    ) -> None: ...

    async def start(self, id: str) -> None: ...

    async def exec(
        self,
        id: str,
        process_json: bytes,
        *,
        pid_file: str,
        console_socket: str | None,
        stdio: Stdio,
    ) -> None: ...

    async def kill(self, id: str, signal: int, all: bool = False) -> None: ...

    async def delete(self, id: str, force: bool = False) -> None: ...

    async def pause(self, id: str) -> None: ...

    async def resume(self, id: str) -> None: ...

    async def ps(self, id: str) -> list[int]: ...

    async def update(self, id: str, resources_json: bytes) -> None: ...

    async def state(self, id: str) -> dict[str, Any]: ...

    # ``args``: the command's flags (shim.task.checkpoint builds them), without the id.
    async def checkpoint(self, id: str, args: Sequence[str]) -> None: ...

    async def restore(self, id: str, args: Sequence[str], *, stdio: Stdio) -> None: ...


def _process_file_dir() -> str:
    return os.environ.get("XDG_RUNTIME_DIR") or os.environ.get("TMPDIR") or "/tmp"


def _write_process_file(data: bytes) -> str:
    directory = _process_file_dir()
    if not data.endswith(b"\n"):
        data += b"\n"
    for _ in range(100):
        path = os.path.join(directory, f"runc-process{int.from_bytes(os.urandom(4), 'big')}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        try:
            write_all(fd, data)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return path
    raise FileExistsError(f"no free runc-process file name in {directory}")


def _last_error(log_path: str, offset: int) -> str | None:
    """The last ``"level":"error"`` msg that runc appended after ``offset``."""
    try:
        with open(log_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # runc truncates nothing, but someone might have: then read it all.
            start = offset if offset <= size else 0
            start = max(start, size - _LOG_TAIL_LIMIT)
            f.seek(start)
            tail = f.read()
    except OSError:
        return None
    message = None
    for line in tail.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") == "error":
            msg = entry.get("msg")
            if isinstance(msg, str):
                message = msg.strip()
    return message


# How often a start that waits on the exec fifo checks that the init still lives
# (runc's own interval).
_FIFO_CHECK_INTERVAL = 0.1


async def _read_exec_fifo(fd: int, pid: int) -> bytes:
    """All the init writes to its exec fifo (read side ``fd``, non-blocking), until its
    exec closes the write end; what is there if the init dies first, else an error."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    while True:
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _wake, ready)
        try:
            await asyncio.wait_for(ready, _FIFO_CHECK_INTERVAL)
        except TimeoutError:
            if not gone(pid):
                continue
            # Started, ran and exited between two checks: its byte is still there.
            with contextlib.suppress(BlockingIOError):
                data += os.read(fd, 4096)
            if not data:
                raise RuntimeFailure("container process is already dead") from None
            return bytes(data)
        finally:
            loop.remove_reader(fd)
        while True:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                break  # the init still holds its end: it has not exec'd yet
            if not chunk:
                return bytes(data)  # every writer gone: the init exec'd (or died)
            data += chunk


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _log_size(log_path: str) -> int:
    try:
        return os.stat(log_path).st_size
    except OSError:
        return 0


class Runc:
    """runc (or crun) driven through its CLI, one instance per container bundle."""

    def __init__(self, reaper: Reaper, options: RuncOptions, namespace: str, bundle: str) -> None:
        self._reaper = reaper
        self.options = options
        self.namespace = namespace
        self.bundle = bundle
        self.log_path = os.path.join(bundle, "log.json")
        # The init's pid file from our own `create`: None after a shim restart, when
        # `start` goes through runc (see _start_directly).
        self._init_pid_file: str | None = None

    # -- building and running commands -------------------------------------------

    def global_args(self) -> list[str]:
        args = [
            self.options.binary,
            "--root",
            os.path.join(self.options.root, self.namespace),
            "--log",
            self.log_path,
            "--log-format",
            "json",
        ]
        if self.options.criu_path:
            args += ["--criu", self.options.criu_path]
        if self.options.systemd_cgroup:
            args.append("--systemd-cgroup")
        return args

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # systemd's notify socket belongs to whoever started us, not to runc.
        env.pop("NOTIFY_SOCKET", None)
        return env

    async def _run(
        self,
        args: Sequence[str],
        *,
        stdio: Stdio | None = None,
        input: bytes | None = None,
        from_log: bool = False,
        dies_with_shim: bool = False,
    ) -> bytes:
        """Run the runtime with ``args``; its output, or RuntimeFailure.

        Only `create` runs with ``dies_with_shim``: a container half made
        when the shim died is not made at all. The others finish their work and skip
        the setpriv exec in front (~1.1-1.5 ms each; delete is on `ctr run --rm`'s
        path, exec on every exec's): half a delete or kill is worse than a whole one,
        and an exec that completes without its shim is no different from the init,
        which runs on without the shim too until containerd's clean-up of the dead
        shim (`delete`) removes the container.
        """
        argv = [*self.global_args(), *args]
        offset = _log_size(self.log_path) if from_log else 0
        _log.debug("running %s", " ".join(argv))
        try:
            result = await self._reaper.run(
                argv,
                input=input,
                stdio=stdio,
                cwd=self.bundle,
                env=self._env(),
                pdeathsig=dies_with_shim,
            )
        except OSError as exc:
            raise RuntimeFailure(f"exec: {self.options.binary!r}: {exc.strerror or exc}") from exc
        if result.status == 0:
            return result.output
        exec_error = (
            f"{self.options.binary} did not terminate successfully: "
            f"exit status {result.status}: {result.output.decode(errors='replace')}"
        )
        message = (_last_error(self.log_path, offset) if from_log else None) or exec_error
        raise RuntimeFailure(message, status=result.status, output=result.output)

    # -- the Runtime interface ---------------------------------------------------

    async def create(
        self,
        id: str,
        *,
        pid_file: str,
        console_socket: str | None,
        stdio: Stdio,
        no_pivot: bool = False,
        no_new_keyring: bool = False,
    ) -> None:
        args = ["create", "--bundle", self.bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        if no_new_keyring:
            args.append("--no-new-keyring")
        args.append(id)
        await self._run(args, stdio=stdio, from_log=True, dies_with_shim=True)
        self._init_pid_file = pid_file

    async def start(self, id: str) -> None:
        if not await self._start_directly(id):
            await self._run(["start", id], from_log=True)

    async def _start_directly(self, id: str) -> bool:
        """`runc start`'s whole work, without running runc (~7 ms, plus ~1-2 ms of the
        setpriv in front of it); False where runc must do it.

        A created runc container's init is blocked opening ``exec.fifo`` in runc's
        state dir for writing; `runc start` opens it for reading, reads the byte the
        init writes, reads on until the init's exec closes its end, and removes the
        fifo (runc calls a container "created" while the fifo exists, "running" once it
        is gone). Doing the same here is what runc does, with runc's errors. Only for
        runc itself (its state layout), for an init this shim created, and without
        poststart hooks (runc versions differ on whether `start` runs them).
        """
        pid_file = self._init_pid_file
        if pid_file is None or os.path.basename(self.options.binary) != "runc":
            return False
        fifo = os.path.join(self.options.root, self.namespace, id, "exec.fifo")
        try:
            if not stat.S_ISFIFO(os.lstat(fifo).st_mode) or self._has_poststart_hooks():
                return False
            with open(pid_file, "rb") as f:
                pid = int(f.read())
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, ValueError):
            return False  # runc reports whatever is wrong, in its words
        try:
            data = await _read_exec_fifo(fd, pid)
        finally:
            os.close(fd)
        if not data:
            raise RuntimeFailure("cannot start an already running container")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fifo)
        return True

    def _has_poststart_hooks(self) -> bool:
        with open(os.path.join(self.bundle, "config.json"), "rb") as f:
            spec = json.load(f)
        hooks = spec.get("hooks") if isinstance(spec, dict) else None
        return bool(isinstance(hooks, dict) and hooks.get("poststart"))

    async def exec(
        self,
        id: str,
        process_json: bytes,
        *,
        pid_file: str,
        console_socket: str | None,
        stdio: Stdio,
    ) -> None:
        process_file = _write_process_file(process_json)
        try:
            args = ["exec", "--process", process_file]
            if console_socket:
                args += ["--console-socket", console_socket]
            args += ["--detach", "--pid-file", pid_file, id]
            await self._run(args, stdio=stdio, from_log=True)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(process_file)

    async def kill(self, id: str, signal: int, all: bool = False) -> None:
        args = ["kill", "--all"] if all else ["kill"]
        await self._run([*args, id, str(int(signal))], from_log=all)

    async def delete(self, id: str, force: bool = False) -> None:
        args = ["delete", "--force", id] if force else ["delete", id]
        await self._run(args, from_log=True)

    async def pause(self, id: str) -> None:
        await self._run(["pause", id], from_log=True)

    async def resume(self, id: str) -> None:
        await self._run(["resume", id], from_log=True)

    async def ps(self, id: str) -> list[int]:
        output = await self._run(["ps", "--format", "json", id])
        try:
            pids = json.loads(output)
        except ValueError as exc:
            raise RuntimeFailure(f"unable to parse ps output {output!r}: {exc}") from exc
        if pids is None:
            return []
        if not isinstance(pids, list) or not all(isinstance(p, int) for p in pids):
            raise RuntimeFailure(f"unexpected ps output {output!r}")
        return pids

    async def update(self, id: str, resources_json: bytes) -> None:
        if not resources_json.endswith(b"\n"):
            resources_json += b"\n"
        await self._run(["update", "--resources", "-", id], input=resources_json)

    async def checkpoint(self, id: str, args: Sequence[str]) -> None:
        # The reference's error is runc's own output (CRIU's failure and its log's
        # path), not log.json's last line.
        await self._run(["checkpoint", *args, id])

    async def restore(self, id: str, args: Sequence[str], *, stdio: Stdio) -> None:
        # Like create, half a restore made by a dying shim is no restore.
        await self._run(["restore", *args, id], stdio=stdio, from_log=True, dies_with_shim=True)

    async def state(self, id: str) -> dict[str, Any]:
        output = await self._run(["state", id])
        try:
            state = json.loads(output)
        except ValueError as exc:
            raise RuntimeFailure(f"unable to parse state output {output!r}: {exc}") from exc
        if not isinstance(state, dict):
            raise RuntimeFailure(f"unexpected state output {output!r}")
        return state
