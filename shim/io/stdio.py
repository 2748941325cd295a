"""A process's stdio: fifos, files, logging binaries, null, and terminals (io.md §1-2).

`open_process_io()` prepares everything before runc runs (so a bad path fails
the request before a container exists), `ProcessIO.started()` finishes the job
once runc has returned, and `close()` undoes all of it. All copying happens on
the event loop through `shim.io.copy.Copier`.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import stat
import struct
import termios
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from protocol.ttrpc.status import Code, TtrpcError
from shim.io.console import ConsoleError, ConsoleSocket, set_winsize
from shim.io.copy import Copier, open_fifo_writer, set_nonblocking, wait_readable

__all__ = [
    "InvalidStdioError",
    "ProcessIO",
    "StdioError",
    "StdioSpec",
    "UnknownSchemeError",
    "open_process_io",
    "validate_spec",
]

_log = logging.getLogger(__name__)

# io.md §1.4: how long a logging binary gets between SIGTERM and SIGKILL.
LOGGER_STOP_TIMEOUT = 12.0
# The reference waits for a logger's readiness without a bound; a logger that
# neither closes fd 5 nor exits for this long is treated as broken.
LOGGER_READY_TIMEOUT = 30.0
# After SIGKILL the exit arrives promptly; the bound only protects close().
_KILL_WAIT = 5.0
# drain(): how often to look whether the client has read a fifo empty. Only while a
# process's exit waits on its unread output, within the drain's own bound.
_UNREAD_FIRST_LOOK = 0.001
_UNREAD_MAX_LOOK = 0.05


class StdioError(Exception):
    """The stdio of a process cannot be set up as requested."""


class UnknownSchemeError(StdioError):
    def __init__(self, scheme: str) -> None:
        super().__init__(f"unknown STDIO scheme {scheme}")
        self.scheme = scheme


class InvalidStdioError(StdioError, TtrpcError):
    """A stdio string no retry can make work: InvalidArgument (3) for the caller,
    where a path that merely failed to open stays Unknown (2) like the reference."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.INVALID_ARGUMENT, message)


@dataclass(frozen=True, slots=True)
class StdioSpec:
    stdin: str
    stdout: str
    stderr: str
    terminal: bool

    @property
    def is_null(self) -> bool:
        return not (self.stdin or self.stdout or self.stderr)


class _Reaper(Protocol):
    """The part of `shim.reaper.Reaper` this module uses."""

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
    ) -> int: ...

    async def wait(self, pid: int) -> int: ...


def url_scheme(uri: str) -> str:
    """The scheme the way Go's url.Parse finds it ("" for a plain path), lower-cased."""
    for i, c in enumerate(uri):
        if c.isascii() and c.isalpha():
            continue
        if c.isascii() and (c.isdigit() or c in "+-."):
            if i == 0:
                return ""
            continue
        if c == ":" and i > 0:
            return uri[:i].lower()
        return ""
    return ""


def _url_path(uri: str) -> str:
    from urllib.parse import unquote, urlsplit

    return unquote(urlsplit(uri).path)


def logger_argv(uri: str) -> list[str]:
    """binary:///path?k=v&flag -> [path, k, v, flag, ""] (first value of each key)."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    parts = urlsplit(uri)
    argv = [unquote(parts.path)]
    seen: set[str] = set()
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in seen:
            seen.add(key)
            argv += [key, value]
    return argv


def validate_spec(spec: StdioSpec) -> None:
    """Refuse, before anything is opened, stdio strings that name no usable path.

    Paths must be absolute: the shim's cwd is the bundle, so a relative path would
    quietly open (or, for file://, create) something inside it. A NUL byte cannot be
    in a path at all (os.open would raise ValueError, which reads as an internal
    failure). Only the strings the chosen kind actually uses are checked: ctr passes
    the same file:// or binary:// URI as stdout and stderr.
    """
    for name, value in (("stdin", spec.stdin), ("stdout", spec.stdout), ("stderr", spec.stderr)):
        if "\0" in value:
            raise InvalidStdioError(f"{name} {value!r}: contains a NUL byte")
    if spec.is_null:
        return
    scheme = url_scheme(spec.stdout)
    if scheme not in ("", "fifo", "file", "binary"):
        raise UnknownSchemeError(scheme)
    plain: list[tuple[str, str]] = []
    if spec.stdin and (scheme != "binary" or spec.terminal):
        plain.append(("stdin", spec.stdin))
    if scheme in ("file", "binary"):
        _check_uri_path(spec.stdout, scheme)
    else:
        plain.append(("stdout", spec.stdout))
        if not spec.terminal:
            plain.append(("stderr", spec.stderr))
    for name, path in plain:
        if path and not path.startswith("/"):
            raise InvalidStdioError(f"{name} {path!r}: must be an absolute path")


def _check_uri_path(uri: str, scheme: str) -> None:
    from urllib.parse import urlsplit

    what = "log file" if scheme == "file" else "logging binary"
    try:
        host = urlsplit(uri).netloc
    except ValueError as exc:  # e.g. an unclosed "[" taken for an IPv6 host
        raise InvalidStdioError(f"stdout {uri!r}: {exc}") from exc
    if host:
        # Go's url.Parse takes "file://var/log/x" as host "var" + path "/log/x"; the
        # reference drops the host and writes elsewhere than the caller meant.
        raise InvalidStdioError(
            f"stdout {uri!r}: {scheme}:// needs an absolute {what} path "
            f"({scheme}:///abs/path), not host {host!r}"
        )
    # The percent-decoded path and logger arguments, where "%00" becomes a NUL.
    decoded = logger_argv(uri) if scheme == "binary" else [_url_path(uri)]
    if any("\0" in part for part in decoded):
        raise InvalidStdioError(f"stdout {uri!r}: contains an encoded NUL byte")
    if not decoded[0].startswith("/"):
        raise InvalidStdioError(f"stdout {uri!r}: the {what} path must be absolute")


@dataclass(slots=True)
class _Dest:
    """An output destination, possibly shared by stdout and stderr."""

    fd: int
    # Our own read handle on a fifo destination: while it is open a client that
    # goes away makes our writes wait (back-pressure) instead of failing EPIPE.
    # Once the copies end it stays open until the client has read the fifo empty
    # (drain), since it is what lets us see how much the client has not read yet.
    keeper: int | None = None
    refs: int = 0


def unread_bytes(fd: int) -> int:
    """How many bytes wait in the pipe or fifo that `fd` is an end of (FIONREAD)."""
    raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    n: int = struct.unpack("i", raw)[0]
    return n


class _Logger:
    def __init__(self, pid: int, reaper: _Reaper) -> None:
        self.pid = pid
        self.exited: asyncio.Task[int] = asyncio.get_running_loop().create_task(reaper.wait(pid))

    async def stop(self) -> None:
        if self._signal(signal.SIGTERM):
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), LOGGER_STOP_TIMEOUT)
                return
            except TimeoutError:
                _log.warning("logging binary %d ignored SIGTERM; killing it", self.pid)
            if self._signal(signal.SIGKILL):
                try:
                    await asyncio.wait_for(asyncio.shield(self.exited), _KILL_WAIT)
                except TimeoutError:
                    _log.error("logging binary %d did not die after SIGKILL", self.pid)

    def _signal(self, sig: int) -> bool:
        # The task is done one loop turn after the reaper collected the pid; that
        # turn is the only window in which the pid could be reused, and nothing
        # forks in it.
        if self.exited.done():
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True


class ProcessIO:
    """Everything one process's stdio holds: pipes, fifo handles, console, logger."""

    def __init__(self, *, process_id: str, terminal: bool) -> None:
        self.console_socket: str | None = None
        self._id = process_id
        self._terminal = terminal
        self._fds: set[int] = set()
        self._stdio: tuple[int | None, int | None, int | None] = (None, None, None)
        self._container_ends: list[int] = []
        self._stdin_src: int | None = None
        self._stdin_closer: int | None = None
        self._stdin_copier: Copier | None = None
        self._outputs: list[Copier] = []
        # Copies that start once the runtime made the process: what runc itself wrote
        # to a failed create's or exec's stdio is its error, which the caller reports
        # (the Go shim copies only after create succeeds, too).
        self._pending_outputs: list[tuple[int, _Dest, str]] = []
        self._dests: dict[int, _Dest] = {}
        # Keepers of fifos whose copy ended, kept until the client read them empty.
        self._unread: list[int] = []
        self._console: ConsoleSocket | None = None
        self._master: int | None = None
        self._tty_dest: _Dest | None = None
        self._winsize: tuple[int, int] | None = None
        self._logger: _Logger | None = None
        self._started = False
        self._closing: asyncio.Future[None] | None = None

    # -- the interface -------------------------------------------------------

    def runtime_stdio(self) -> tuple[int | None, int | None, int | None]:
        return self._stdio

    async def started(self) -> None:
        if self._started or self._closing is not None:
            return
        self._started = True
        for fd in self._container_ends:
            self._close(fd)
        self._container_ends = []
        for src, dest, name in self._pending_outputs:
            self._start_output(src, dest, name)
        self._pending_outputs = []
        if self._console is not None:
            await self._attach_console(self._console)

    def resize(self, width: int, height: int) -> None:
        if not self._terminal:
            return
        self._winsize = (width, height)
        if self._master is not None:
            set_winsize(self._master, width, height)

    def close_stdin(self) -> None:
        if self._stdin_closer is not None:
            self._close(self._stdin_closer)
            self._stdin_closer = None

    async def drain(self, timeout: float) -> None:
        """Wait (at most `timeout` s) until the output is copied and read.

        Copied: every output copy reached the end of its source and wrote all of it.
        Read: the client has also taken it out of the fifos. A client may stop
        reading as soon as the exit is reported (containerd 2.x's client closes its
        fifos at task Delete, which ctr run calls right after Wait returns), so the
        bytes still in a fifo then would be lost: the exit waits for them too.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = [c.done for c in self._outputs if not c.done.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        # No readiness event says "a pipe is empty" (EPOLLOUT means "not full"), so
        # look, backing off: one look when the client keeps up, a few when it lags.
        delay = _UNREAD_FIRST_LOOK
        for keeper in list(self._unread):
            # close() may run while we sleep: it takes the keeper out of the list.
            while keeper in self._unread:
                try:
                    unread = unread_bytes(keeper)
                except OSError:
                    unread = 0
                if unread == 0:
                    self._unread.remove(keeper)
                    self._close(keeper)
                    break
                left = deadline - loop.time()
                if left <= 0:
                    return
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, _UNREAD_MAX_LOOK)

    async def close(self) -> None:
        if self._closing is not None:
            await asyncio.shield(self._closing)
            return
        self._closing = asyncio.get_running_loop().create_future()
        try:
            for copier in [*self._outputs, *filter(None, [self._stdin_copier])]:
                copier.cancel()
            if self._console is not None:
                self._console.close()
            self._master = None
            for fd in list(self._fds):
                self._close(fd)
            self._dests.clear()
            self._unread.clear()
            if self._logger is not None:
                await self._logger.stop()
        finally:
            self._closing.set_result(None)

    # -- set-up (called by open_process_io) ------------------------------------

    async def _setup(
        self,
        spec: StdioSpec,
        *,
        process_id: str,
        namespace: str,
        reaper: _Reaper,
        io_uid: int | None,
        io_gid: int | None,
    ) -> None:
        scheme = url_scheme(spec.stdout)
        if scheme not in ("", "fifo", "file", "binary"):
            raise UnknownSchemeError(scheme)
        if spec.terminal:
            await self._setup_terminal(spec, scheme, process_id, namespace, reaper)
        elif spec.is_null:
            pass
        elif scheme == "binary":
            await self._setup_binary(spec.stdout, process_id, namespace, reaper)
        else:
            await self._setup_pipes(spec, scheme)
        if io_uid is not None or io_gid is not None:
            uid = -1 if io_uid is None else io_uid
            gid = -1 if io_gid is None else io_gid
            for fd in self._container_ends:
                os.fchown(fd, uid, gid)

    async def _setup_pipes(self, spec: StdioSpec, scheme: str) -> None:
        stdin_w: int | None = None
        stdin_r: int | None = None
        if spec.stdin:
            self._open_stdin(spec.stdin)
            stdin_r, stdin_w = self._pipe()
            set_nonblocking(stdin_w)
        if scheme == "file":
            dest = await self._open_file_dest(_url_path(spec.stdout))
            targets: list[tuple[str, _Dest | None]] = [("stdout", dest), ("stderr", dest)]
        else:
            targets = []
            by_path: dict[str, _Dest] = {}
            for name, path in (("stdout", spec.stdout), ("stderr", spec.stderr)):
                if not path:
                    targets.append((name, None))
                elif path in by_path:
                    targets.append((name, by_path[path]))
                else:
                    by_path[path] = dest = await self._open_path_dest(name, path)
                    targets.append((name, dest))
        out_ends: list[int | None] = []
        for name, target in targets:
            if target is None:
                out_ends.append(None)
                continue
            read_end, write_end = self._pipe()
            set_nonblocking(read_end)
            out_ends.append(write_end)
            self._pending_outputs.append((read_end, target, name))
        self._stdio = (stdin_r, out_ends[0], out_ends[1])
        self._container_ends = [fd for fd in self._stdio if fd is not None]
        if stdin_w is not None:
            self._start_stdin(stdin_w)

    async def _setup_terminal(
        self, spec: StdioSpec, scheme: str, process_id: str, namespace: str, reaper: _Reaper
    ) -> None:
        if scheme == "binary":
            out_w, err_w = await self._setup_binary(spec.stdout, process_id, namespace, reaper)
            # fd 4 exists for the logger but a terminal has a single output stream.
            self._container_ends = [err_w]
            set_nonblocking(out_w)
            self._tty_dest = self._adopt_dest(_Dest(out_w))
            self._stdio = (None, None, None)
        elif scheme == "file":
            self._tty_dest = await self._open_file_dest(_url_path(spec.stdout))
        elif spec.stdout:
            self._tty_dest = await self._open_path_dest("stdout", spec.stdout)
        else:
            # Nobody wants the output, but the master must still be read or the
            # container blocks once the terminal's buffer is full.
            self._tty_dest = self._adopt_dest(_Dest(self._own(os.open(os.devnull, os.O_WRONLY))))
        if spec.stdin:
            self._open_stdin(spec.stdin)
        self._console = ConsoleSocket.create()
        self.console_socket = self._console.path

    async def _setup_binary(
        self, uri: str, process_id: str, namespace: str, reaper: _Reaper
    ) -> tuple[int, int]:
        argv = logger_argv(uri)
        out_r, out_w = self._pipe()
        err_r, err_w = self._pipe()
        ready_r, ready_w = self._pipe()
        env = {"CONTAINER_ID": process_id, "CONTAINER_NAMESPACE": namespace}
        try:
            pid = reaper.spawn(
                argv,
                env=env,
                # The container keeps logging through a shim crash only if the
                # logger outlives the shim.
                pdeathsig=False,
                fd_map={3: out_r, 4: err_r, 5: ready_w},
            )
        except OSError as exc:
            raise StdioError(f"failed to start logging binary {argv[0]}: {exc}") from exc
        self._logger = _Logger(pid, reaper)
        for fd in (out_r, err_r, ready_w):
            self._close(fd)
        set_nonblocking(ready_r)
        try:
            async with asyncio.timeout(LOGGER_READY_TIMEOUT):
                while True:
                    try:
                        os.read(ready_r, 1)  # a byte or EOF: either means ready
                        break
                    except BlockingIOError:
                        await wait_readable(ready_r)
        except TimeoutError:
            raise StdioError(f"logging binary {argv[0]} did not become ready") from None
        finally:
            self._close(ready_r)
        self._stdio = (None, out_w, err_w)
        self._container_ends = [out_w, err_w]
        return out_w, err_w

    # -- helpers ---------------------------------------------------------------

    def _own(self, fd: int) -> int:
        self._fds.add(fd)
        return fd

    def _close(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.discard(fd)
            os.close(fd)

    def _pipe(self) -> tuple[int, int]:
        read_end, write_end = os.pipe()
        self._own(read_end)
        self._own(write_end)
        return read_end, write_end

    def _adopt_dest(self, dest: _Dest) -> _Dest:
        self._own(dest.fd)
        if dest.keeper is not None:
            self._own(dest.keeper)
        self._dests[dest.fd] = dest
        return dest

    def _release_dest(self, dest: _Dest) -> None:
        dest.refs -= 1
        if dest.refs > 0:
            return
        self._dests.pop(dest.fd, None)
        # Our write end closed: the client reads what the fifo holds, then EOF.
        self._close(dest.fd)
        if dest.keeper is not None:
            if self._closing is None:
                self._unread.append(dest.keeper)
            else:
                self._close(dest.keeper)

    def _open_stdin(self, path: str) -> None:
        # Reading first makes the write open below succeed at once, and both
        # are non-blocking, so neither waits for the client.
        try:
            self._stdin_src = self._own(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
            if not stat.S_ISFIFO(os.fstat(self._stdin_src).st_mode):
                raise StdioError(f"stdin {path!r} is not a fifo")
            self._stdin_closer = self._own(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as exc:
            raise StdioError(f"opening stdin {path!r} failed: {exc.strerror or exc}") from exc

    async def _open_path_dest(self, name: str, path: str) -> _Dest:
        try:
            if stat.S_ISFIFO(os.stat(path).st_mode):
                fd = self._own(await open_fifo_writer(path))
                keeper = self._own(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
                return self._adopt_dest(_Dest(fd, keeper))
            return self._adopt_dest(_Dest(self._own(os.open(path, os.O_WRONLY | os.O_APPEND))))
        except TimeoutError as exc:
            raise StdioError(f"opening {name} {path!r} failed: {exc}") from exc
        except OSError as exc:
            raise StdioError(f"opening {name} {path!r} failed: {exc.strerror or exc}") from exc

    async def _open_file_dest(self, path: str) -> _Dest:
        if not path:
            raise StdioError("file:// stdio needs an absolute path")
        try:
            os.makedirs(os.path.dirname(path) or "/", 0o755, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StdioError(f"opening log file {path!r} failed: {exc.strerror or exc}") from exc
        return self._adopt_dest(_Dest(self._own(fd)))

    def _start_output(self, src: int, dest: _Dest, name: str, *, own_src: bool = True) -> Copier:
        dest.refs += 1

        def done(copier: Copier) -> None:
            # The master outlives its output copy: stdin and resize still use it.
            if own_src:
                self._close(src)
            self._release_dest(dest)

        copier = Copier(src, dest.fd, name=f"{self._id} {name}", on_done=done)
        self._outputs.append(copier)
        copier.start()
        return copier

    def _start_stdin(self, dst: int, *, console: bool = False) -> None:
        src = self._stdin_src
        if src is None:
            return

        def done(copier: Copier) -> None:
            self._close(src)
            self._stdin_src = None
            if console:
                self._hang_up()
            else:
                self._close(dst)

        self._stdin_copier = Copier(src, dst, name=f"{self._id} stdin", on_done=done)
        self._stdin_copier.start()

    async def _attach_console(self, console: ConsoleSocket) -> None:
        try:
            master = self._own(await console.receive())
        except ConsoleError as exc:
            raise StdioError(str(exc)) from exc
        finally:
            self._console = None
        self._master = master
        set_nonblocking(master)
        if self._winsize is not None:
            set_winsize(master, *self._winsize)
        if self._tty_dest is not None:
            self._start_output(master, self._tty_dest, "console", own_src=False)
            self._tty_dest = None
        self._start_stdin(master, console=True)

    def _hang_up(self) -> None:
        # The reference closes the master when stdin ends: the terminal hangs up.
        master = self._master
        if master is None:
            return
        self._master = None
        for copier in self._outputs:
            if copier.src == master:
                copier.stop_reading()
        self._close(master)


async def open_process_io(
    spec: StdioSpec,
    *,
    process_id: str,
    namespace: str,
    reaper: _Reaper,
    io_uid: int | None = None,
    io_gid: int | None = None,
) -> ProcessIO:
    """Open everything `spec` names; on failure nothing stays open."""
    validate_spec(spec)
    pio = ProcessIO(process_id=process_id, terminal=spec.terminal)
    try:
        await pio._setup(
            spec,
            process_id=process_id,
            namespace=namespace,
            reaper=reaper,
            io_uid=io_uid,
            io_gid=io_gid,
        )
    except BaseException:
        await pio.close()
        raise
    return pio
