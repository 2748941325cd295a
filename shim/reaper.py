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
import functools
import logging
import os
import signal
import stat
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


# util-linux setpriv sets PR_SET_PDEATHSIG itself, so the shim spawns without a
# preexec_fn, which would make subprocess fork() instead of vfork(): `runc --version`
# from a 28 MiB shim took 9.5 ms forked with a preexec_fn, 6.5 ms vforking setpriv.
SETPRIV = "setpriv"
# The name in setpriv's getopt table, there only when it knows the option
# (util-linux >= 2.33): checked by reading the file once per process, not by running it.
_PDEATHSIG_OPTION = b"\0pdeathsig\0"


@functools.cache
def setpriv_path() -> str | None:
    """Absolute path of a setpriv that knows ``--pdeathsig``, or None (then fork+prctl)."""
    for directory in os.get_exec_path():
        path = os.path.join(directory, SETPRIV)
        if not os.path.isabs(path) or not os.access(path, os.X_OK):
            continue
        try:
            with open(path, "rb") as f:
                if _PDEATHSIG_OPTION in f.read():
                    return path
        except OSError:
            continue
    return None


def _child_setup(parent: int) -> Callable[[], None]:
    from shim.sys import syscalls

    # Resolve libc now: dlopen in the forked child could deadlock on the loader lock.
    syscalls.load_libc()

    def setup() -> None:
        syscalls.set_pdeathsig(signal.SIGKILL)
        # The parent may have died between fork() and prctl(): then no signal comes.
        if os.getppid() != parent:
            os._exit(137)

    return setup


def _check_executable(name: str, env: Mapping[str, str] | None, cwd: str | None) -> None:
    """Raise the OSError Popen would raise for exec'ing ``name``.

    With setpriv in front, Popen only sees setpriv's exec; a missing runc would be
    setpriv exiting 127. Looking the way Popen (and setpriv's execvp) looks keeps the
    error the same: the first non-ENOENT/ENOTDIR error, else ENOENT, named ``name``.
    """
    if os.sep in name:
        candidates = [name]
    else:
        candidates = [os.path.join(d, name) for d in os.get_exec_path(env)]
    first_error = 0
    for path in candidates:
        if cwd is not None and not os.path.isabs(path):
            path = os.path.join(cwd, path)
        try:
            st = os.stat(path)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                first_error = first_error or exc.errno or errno.EACCES
            continue
        if stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK):
            return
        first_error = first_error or errno.EACCES
    if cwd is not None and not (os.path.isdir(cwd) and os.access(cwd, os.X_OK)):
        return  # Popen's chdir fails first and reports the cwd, as without setpriv
    code = first_error or errno.ENOENT
    raise OSError(code, os.strerror(code), name)


def _setpriv_exec_error(wrapper: str, name: str, status: int, output: bytes) -> OSError | None:
    """The exec error behind setpriv's own failure, when only that is in ``output``.

    For what ``_check_executable`` cannot see in advance (the binary removed after the
    check, a script's missing interpreter): setpriv exits 126/127 with
    "setpriv: failed to execute NAME: STRERROR". Only a C/English message maps back.
    """
    if status not in (126, 127):
        return None
    prefix = f"{os.path.basename(wrapper)}: failed to execute {name}: ".encode()
    if not output.startswith(prefix) or output.find(b"\n") != len(output) - 1:
        return None
    text = output[len(prefix) : -1].decode(errors="replace")
    for code in errno.errorcode:
        if os.strerror(code) == text:
            return OSError(code, text, name)
    return None


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

        ``pdeathsig``: the child gets SIGKILL when the shim dies, set by ``setpriv``
        exec'd in front of ``argv`` (same pid, argv, env, cwd, fds, process group) when
        there is one, else by prctl in a forked child (slower: no vfork with a preexec_fn).
        With setpriv, a shim that dies before setpriv reached its prctl (~1 ms after
        vfork, a few ms on a loaded machine) leaves the command running to its end:
        setpriv cannot check getppid() as the fork path does. For `runc create`, the
        one that matters, the delete subcommand kills such a leftover (delete.py).

        Raises ``OSError`` (e.g. ``FileNotFoundError``) when the exec fails; that child
        is already collected by then. With setpriv, exec failures that no check can
        see beforehand (a script's missing interpreter, the binary removed meanwhile)
        are an exit status of 127 (126: not executable) and setpriv's message on the
        child's stderr; ``run()`` turns that message back into the ``OSError``.
        """
        return self._spawn(
            argv,
            (stdin, stdout, stderr),
            cwd=cwd,
            env=env,
            pass_fds=pass_fds,
            pdeathsig=pdeathsig,
            new_pgroup=new_pgroup,
            fd_map=fd_map,
        )[0]

    def _spawn(
        self,
        argv: Sequence[str],
        std: tuple[int | None, int | None, int | None],
        *,
        cwd: str | None,
        env: Mapping[str, str] | None,
        pass_fds: Sequence[int],
        pdeathsig: bool = True,
        new_pgroup: bool = False,
        fd_map: Mapping[int, int] | None = None,
    ) -> tuple[int, str | None]:
        """``spawn()``, and the setpriv that runs in front of ``argv`` (None if none)."""
        if not argv:
            raise ValueError("empty argv")
        if fd_map:
            if pass_fds or cwd is not None or pdeathsig:
                raise ValueError("fd_map excludes pass_fds, cwd and pdeathsig")
            pid = _spawn_with_fd_map(argv, std, env, fd_map, new_pgroup)
            self._owned.add(pid)
            return pid, None
        wrapper = setpriv_path() if pdeathsig else None
        args = list(argv)
        preexec: Callable[[], None] | None = None
        if wrapper is not None:
            _check_executable(args[0], env, cwd)
            args = [wrapper, "--pdeathsig", "KILL", "--", *args]
        elif pdeathsig:
            preexec = _child_setup(os.getpid())
        stdin, stdout, stderr = std
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=subprocess.DEVNULL if stdout is None else stdout,
            stderr=subprocess.DEVNULL if stderr is None else stderr,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            close_fds=True,
            pass_fds=tuple(pass_fds),
            preexec_fn=preexec,
            process_group=0 if new_pgroup else None,
        )
        pid = proc.pid
        self._owned.add(pid)
        # Popen.__del__ and subprocess._cleanup() poll any child whose returncode is
        # None with waitpid(); a value here makes them leave this pid to us.
        proc.returncode = 0
        return pid, wrapper

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
        pdeathsig: bool = True,
    ) -> RunResult:
        """Run to completion. Output (stdout+stderr together) is captured unless ``stdio``.

        ``input`` is written to the child's stdin (which must then not be set in
        ``stdio``). Returns once the child exited and the captured output hit EOF.
        Raises ``OSError`` when the exec fails, as ``spawn()``; ``pdeathsig`` as there.
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
            pid, wrapper = self._spawn(
                argv,
                (std_in, std_out, std_err),
                cwd=cwd,
                env=env,
                pass_fds=pass_fds,
                pdeathsig=pdeathsig,
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
            if wrapper is not None:
                error = _setpriv_exec_error(wrapper, argv[0], status, output)
                if error is not None:
                    raise error
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
