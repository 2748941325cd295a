"""The one place in the shim that collects child exits (``wait4``), and the way to spawn.

The shim is a child subreaper: container inits and exec'd processes are re-parented
to it, and runc, loggers and helpers are its direct children. A second ``waitpid``
anywhere (``subprocess.wait``, asyncio's child watchers) would steal an exit and lose
a container's status, so every exit goes through ``Reaper._reap``:

- pids started with ``spawn()`` are *owned*: their status goes to ``wait(pid)``;
- every other pid (container processes, orphans) goes to the ``subscribe()`` callbacks.

All methods must be called from the event loop's thread: a pid is registered by
``spawn()`` before control returns to the loop, so the SIGCHLD callback (which only
runs on the loop) can never see an owned pid before it is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Reaper", "RunResult", "exit_status"]

_log = logging.getLogger("shim.reaper")

# After the child exits, how long run() keeps reading captured output that a
# detached grandchild might be holding open; past that, the output so far is returned.
EOF_GRACE_SECONDS = 2.0

_READ_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class RunResult:
    status: int
    output: bytes


def exit_status(wait_status: int) -> int:
    """Exit code, or 128 + signal number for a process killed by a signal."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    # wait4 without WUNTRACED/WCONTINUED never reports these; keep the raw value visible.
    return wait_status


def _child_setup(pdeathsig: bool, parent: int) -> Callable[[], None] | None:
    if not pdeathsig:
        return None
    from shim import syscalls

    # Resolve libc now: dlopen in the forked child could deadlock on the loader lock.
    syscalls.load_libc()

    def setup() -> None:
        syscalls.set_pdeathsig(signal.SIGKILL)
        # The parent may have died between fork() and prctl(): then no signal comes.
        if os.getppid() != parent:
            os._exit(137)

    return setup


def _spawn_with_fd_map(
    argv: Sequence[str],
    std: tuple[int | None, int | None, int | None],
    env: Mapping[str, str] | None,
    fd_map: Mapping[int, int],
    new_pgroup: bool,
) -> int:
    """posix_spawn with fds placed at exact numbers.

    Not Popen: its error pipe sits at an unknown fd number in the child, which
    placing a fd on 3/4/5 could overwrite (losing exec errors), and its close_fds
    would close the placed fds again.
    """
    if any(child < 3 for child in fd_map):
        raise ValueError("fd_map targets must be >= 3 (use stdin/stdout/stderr)")
    sources = {i: fd for i, fd in enumerate(std) if fd is not None} | dict(fd_map)
    above = max(*sources, *sources.values(), 2) + 1
    lifted = {child: above + i for i, child in enumerate(sources)}
    # Lift every source above all targets first, so that placing one can never
    # overwrite another source that happens to sit on a target number.
    actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
        (os.POSIX_SPAWN_DUP2, sources[child], tmp) for child, tmp in lifted.items()
    ]
    for child in (0, 1, 2):
        if child not in sources:
            actions.append((os.POSIX_SPAWN_OPEN, child, os.devnull, os.O_RDWR, 0))
    for child, tmp in lifted.items():
        actions += [(os.POSIX_SPAWN_DUP2, tmp, child), (os.POSIX_SPAWN_CLOSE, tmp)]
    # Everything the shim opens is O_CLOEXEC; close any inherited stray as Popen would.
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in sources and fd not in lifted.values():
            with contextlib.suppress(OSError):
                if os.get_inheritable(fd):
                    actions.append((os.POSIX_SPAWN_CLOSE, fd))
    spawn_env = dict(env) if env is not None else dict(os.environ)
    # Python ignores SIGPIPE/SIGXFSZ; a child must start with the defaults.
    defaults = (signal.SIGPIPE, signal.SIGXFSZ)
    if new_pgroup:
        return os.posix_spawnp(
            argv[0], list(argv), spawn_env, file_actions=actions, setpgroup=0,
            setsigmask=(), setsigdef=defaults,
        )  # fmt: skip
    return os.posix_spawnp(
        argv[0], list(argv), spawn_env, file_actions=actions, setsigmask=(), setsigdef=defaults
    )


class Reaper:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._owned: set[int] = set()
        self._exits: dict[int, int] = {}
        self._waiters: dict[int, list[asyncio.Future[int]]] = {}
        self._abandoned: set[int] = set()
        self._subscribers: list[Callable[[int, int], None]] = []
        self._python_handler = False
        self._previous_handler: signal._HANDLER = signal.SIG_DFL

    # -- lifecycle ---------------------------------------------------------------

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Handle SIGCHLD on ``loop`` and collect any child that already died."""
        if self._loop is not None:
            raise RuntimeError("reaper already installed")
        try:
            loop.add_signal_handler(signal.SIGCHLD, self._reap)
        except RuntimeError:
            # uvloop keeps SIGCHLD for its own subprocess support and refuses it here,
            # but still runs plain Python handlers from its signal wakeup fd. The handler
            # only schedules: it may interrupt spawn() before the pid is registered.
            # (Nothing in the shim may use loop.subprocess_exec, which would take it.)
            self._previous_handler = signal.signal(
                signal.SIGCHLD, lambda _sig, _frame: loop.call_soon_threadsafe(self._reap)
            )
            signal.siginterrupt(signal.SIGCHLD, False)
            self._python_handler = True
        self._loop = loop
        self._reap()

    def uninstall(self) -> None:
        """Stop handling SIGCHLD (tests; a shim keeps its reaper for its whole life)."""
        if self._loop is None:
            return
        if self._python_handler:
            signal.signal(signal.SIGCHLD, self._previous_handler)
            self._python_handler = False
        else:
            self._loop.remove_signal_handler(signal.SIGCHLD)
        self._loop = None

    # -- spawning ----------------------------------------------------------------

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        pdeathsig: bool = True,
        new_pgroup: bool = False,
        fd_map: Mapping[int, int] | None = None,
    ) -> int:
        """Fork and exec ``argv``; ``None`` std fds are /dev/null; other fds are closed.

        ``fd_map`` {child fd: parent fd} places fds at exact numbers >= 3 in the child
        (logging binaries expect 3/4/5); it excludes ``pass_fds``, ``cwd`` and
        ``pdeathsig`` (pass ``pdeathsig=False``).

        Raises ``OSError`` (e.g. ``FileNotFoundError``) when the exec fails; that child
        is already collected by then.
        """
        if not argv:
            raise ValueError("empty argv")
        if fd_map:
            if pass_fds or cwd is not None or pdeathsig:
                raise ValueError("fd_map excludes pass_fds, cwd and pdeathsig")
            pid = _spawn_with_fd_map(argv, (stdin, stdout, stderr), env, fd_map, new_pgroup)
            self._owned.add(pid)
            return pid
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=subprocess.DEVNULL if stdout is None else stdout,
            stderr=subprocess.DEVNULL if stderr is None else stderr,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            close_fds=True,
            pass_fds=tuple(pass_fds),
            preexec_fn=_child_setup(pdeathsig, os.getpid()),
            process_group=0 if new_pgroup else None,
        )
        pid = proc.pid
        self._owned.add(pid)
        # Popen.__del__ and subprocess._cleanup() poll any child whose returncode is
        # None with waitpid(); a value here makes them leave this pid to us.
        proc.returncode = 0
        return pid

    async def wait(self, pid: int) -> int:
        """The exit status of a pid from ``spawn()``: exit code or 128 + signal."""
        if pid in self._exits:
            self._owned.discard(pid)
            return self._exits.pop(pid)
        if pid not in self._owned:
            raise ChildProcessError(errno.ECHILD, f"pid {pid} was not spawned by this reaper")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._waiters.setdefault(pid, []).append(fut)
        try:
            return await fut
        finally:
            waiters = self._waiters.get(pid)
            if waiters is not None and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._waiters[pid]

    def abandon(self, pid: int) -> None:
        """Nobody will ``wait()`` for this owned pid: drop its status when it comes."""
        if self._exits.pop(pid, None) is not None:
            self._owned.discard(pid)
        elif pid in self._owned:
            self._abandoned.add(pid)

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        stdio: tuple[int | None, int | None, int | None] | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> RunResult:
        """Run to completion. Output (stdout+stderr together) is captured unless ``stdio``.

        ``input`` is written to the child's stdin (which must then not be set in
        ``stdio``). Returns once the child exited and the captured output hit EOF.
        """
        loop = asyncio.get_running_loop()
        std_in, std_out, std_err = stdio if stdio is not None else (None, None, None)
        if input is not None and std_in is not None:
            raise ValueError("input and stdio[0] are mutually exclusive")
        to_close: list[int] = []
        in_w = out_r = -1
        try:
            if input is not None:
                in_r, in_w = os.pipe()
                to_close.append(in_r)
                std_in = in_r
            if stdio is None:
                out_r, out_w = os.pipe()
                to_close.append(out_w)
                std_out = std_err = out_w
            pid = self.spawn(
                argv,
                stdin=std_in,
                stdout=std_out,
                stderr=std_err,
                cwd=cwd,
                env=env,
                pass_fds=pass_fds,
            )
        except BaseException:
            for fd in (*to_close, in_w, out_r):
                if fd >= 0:
                    os.close(fd)
            raise
        for fd in to_close:
            os.close(fd)

        feeding: asyncio.Future[None] | None = None
        reading: asyncio.Future[bytes] | None = None
        chunks: list[bytes] = []
        try:
            if in_w >= 0:
                assert input is not None
                feeding = _feed(loop, in_w, input)
                in_w = -1  # _feed owns it now
            if out_r >= 0:
                reading, chunks = _drain(loop, out_r)
                out_r = -1
            status = await self.wait(pid)
            output = b""
            if reading is not None:
                try:
                    output = await asyncio.wait_for(asyncio.shield(reading), EOF_GRACE_SECONDS)
                except TimeoutError:
                    _log.warning(
                        "output of %s still open %.1fs after it exited (inherited by a"
                        " descendant?); returning what was read",
                        argv[0],
                        EOF_GRACE_SECONDS,
                    )
                    reading.cancel()
                    output = b"".join(chunks)
            return RunResult(status, output)
        except BaseException:
            self.abandon(pid)
            raise
        finally:
            for fut in (feeding, reading):
                if fut is not None and not fut.done():
                    fut.cancel()

    # -- subscriptions -----------------------------------------------------------

    def subscribe(self, callback: Callable[[int, int], None]) -> Callable[[], None]:
        """``callback(pid, status)`` for every reaped pid not started by ``spawn()``."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    # -- the reaping loop --------------------------------------------------------

    def _reap(self) -> None:
        while True:
            try:
                pid, wait_status, _ = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            self._dispatch(pid, exit_status(wait_status))

    def _dispatch(self, pid: int, status: int) -> None:
        if pid in self._owned:
            if pid in self._abandoned:
                self._abandoned.discard(pid)
                self._owned.discard(pid)
                return
            waiters = self._waiters.pop(pid, None)
            live = [w for w in waiters or () if not w.done()]
            if live:
                self._owned.discard(pid)
                for w in live:
                    w.set_result(status)
            else:
                self._exits[pid] = status
            return
        for callback in list(self._subscribers):
            try:
                callback(pid, status)
            except Exception:
                _log.exception("exit subscriber failed for pid %d", pid)


def _drain(loop: asyncio.AbstractEventLoop, fd: int) -> tuple[asyncio.Future[bytes], list[bytes]]:
    """Read ``fd`` to EOF on the loop; the list holds what was read so far."""
    os.set_blocking(fd, False)
    fut: asyncio.Future[bytes] = loop.create_future()
    chunks: list[bytes] = []

    def finish() -> None:
        loop.remove_reader(fd)
        os.close(fd)

    def on_readable() -> None:
        while True:
            try:
                data = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                return
            except OSError as exc:
                finish()
                fut.set_exception(exc)
                return
            if not data:
                finish()
                fut.set_result(b"".join(chunks))
                return
            chunks.append(data)

    def on_done(f: asyncio.Future[bytes]) -> None:
        if f.cancelled():
            finish()

    loop.add_reader(fd, on_readable)
    fut.add_done_callback(on_done)
    return fut, chunks


def _feed(loop: asyncio.AbstractEventLoop, fd: int, data: bytes) -> asyncio.Future[None]:
    os.set_blocking(fd, False)
    fut: asyncio.Future[None] = loop.create_future()
    view = memoryview(data)
    offset = 0

    def finish() -> None:
        loop.remove_writer(fd)
        os.close(fd)

    def on_writable() -> None:
        nonlocal offset
        try:
            while offset < len(view):
                offset += os.write(fd, view[offset:])
        except BlockingIOError:
            return
        except OSError:
            # The child exited or closed stdin without reading it all: not our error.
            pass
        finish()
        if not fut.done():
            fut.set_result(None)

    def on_done(f: asyncio.Future[None]) -> None:
        if f.cancelled():
            finish()

    loop.add_writer(fd, on_writable)
    fut.add_done_callback(on_done)
    return fut
