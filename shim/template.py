"""The shim template: one idle process that has imported the whole shim and forks daemons.

A directly executed daemon pays an interpreter start and ~100-300 ms of imports per
container, and holds ~18 MB of private heap (code objects, module dicts) that no
other shim shares. Forked from a template that imported everything and froze it
(`gc.freeze()`), a daemon starts in a few ms and shares those pages copy-on-write.

Reliability comes first, so the template is only ever an accelerator:

- `start` asks it over a root-only SOCK_SEQPACKET socket (SO_PEERCRED checked on
  both ends) and falls back to the direct re-exec when it is absent, refuses, is
  slow, or its directory looks wrong. The first `start` spawns it and falls back.
- The forked daemon is double-forked (re-parented to init), so it never depends on
  the template staying alive, and it holds no link to it after the hand-over.
- The hand-over is a three-way exchange: the new daemon reports its pid, `start`
  does what must precede serving (cgroup, oom_score_adj) and then says "go". Any
  other outcome (timeout, `start` gone) makes the new daemon exit before it ever
  touches the listener, so a fallback daemon never shares a socket with a twin.
- The socket name carries a digest of the installed code (shim, protocol, the
  interpreter, installed distributions), so an upgrade never forks stale code; a
  new template asks the stale ones to quit.

This module is imported by `start`, so its top level imports only what `start`
already has; the server half imports the shim when it runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import stat
import struct
import sys

from shim import minijson

TYPE_CHECKING = False  # typing costs ~3 ms at start-up; mypy honours this name

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence
    from typing import Any

DEFAULT_DIR = "/run/pyshim/template"
DIR_ENV = "PYSHIM_TEMPLATE_DIR"
# "0" makes `start` always re-execute the daemon (and never spawn a template).
ENABLE_ENV = "PYSHIM_TEMPLATE"
ACTION = "template"
# Long enough for a fork under heavy load (a fork here takes ~2-5 ms), short enough
# that a wedged template costs one start less than a direct re-exec would.
REPLY_TIMEOUT = 1.0
# How long a forked daemon waits for `start`'s go-ahead before giving up.
GO_TIMEOUT = 30.0
MAX_REQUEST = 1 << 20
GO = b"go"
_CODE_EXTENSIONS = (".py", ".so")
# /proc/<pid>/comm of a direct-exec daemon: the launcher's name, cut to 15 bytes.
SHIM_COMM = b"containerd-shim"
TEMPLATE_COMM = b"pyshim-template"

PR_SET_NAME = 15
PR_SET_MM = 35
PR_SET_MM_MAP = 14
SYS_BRK = 12  # x86_64
# struct prctl_mm_map's leading fields, in order, with their /proc/<pid>/stat field
# numbers (0: not in stat).
_MM_FIELDS = {
    "start_code": 26,
    "end_code": 27,
    "start_data": 45,
    "end_data": 46,
    "start_brk": 47,
    "brk": 0,
    "start_stack": 28,
    "arg_start": 0,
    "arg_end": 0,
    "env_start": 0,
    "env_end": 0,
}


class TemplateError(Exception):
    pass


# -- shared by both halves -------------------------------------------------------


def template_dir() -> str:
    return os.environ.get(DIR_ENV) or DEFAULT_DIR


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1") != "0"


def package_root() -> str:
    """The directory holding the `shim` and `protocol` packages."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _code_files(root: str, rel: str) -> Iterator[tuple[str, os.stat_result]]:
    try:
        entries = sorted(os.scandir(os.path.join(root, rel)), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        name = f"{rel}/{entry.name}"
        if entry.is_dir(follow_symlinks=False):
            if entry.name != "__pycache__":
                yield from _code_files(root, name)
        elif entry.name.endswith(_CODE_EXTENSIONS):
            yield name, entry.stat()


def code_key() -> str:
    """Digest of everything a forked daemon would run: a change means a new template.

    Stats only (~1 ms): sizes and mtimes of our sources, the interpreter, and the
    names (hence versions) of the installed distributions.
    """
    # hashlib would load OpenSSL (~4 ms) for one digest.
    from _sha256 import sha256  # type: ignore[import-not-found]

    h = sha256()
    # realpath: the launcher and a venv wrapper name the same interpreter differently.
    h.update(f"{sys.version}\0{os.path.realpath(sys.executable)}\n".encode())
    root = package_root()
    for top in ("shim", "protocol"):
        for name, st in _code_files(root, top):
            h.update(f"{name}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
    for path in sys.path:
        if os.path.basename(path) not in ("site-packages", "dist-packages"):
            continue
        try:
            names = sorted(n for n in os.listdir(path) if n.endswith(".dist-info"))
        except OSError:
            continue
        h.update(f"{path}\0{'/'.join(names)}\n".encode())
    digest: str = h.hexdigest()
    return digest[:24]


def socket_path(directory: str, key: str) -> str:
    return os.path.join(directory, f"{key}.sock")


def lock_path(directory: str, key: str) -> str:
    return os.path.join(directory, f"{key}.lock")


def _private_dir(directory: str) -> bool:
    """Ours alone: a socket in a directory others can write to could be anyone's."""
    try:
        st = os.lstat(directory)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _peer(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the other end."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _trusted(uid: int) -> bool:
    return uid in (0, os.geteuid())


# -- client: `start` -------------------------------------------------------------


class Forked:
    """A daemon forked by the template, waiting for `go()` before it serves."""

    def __init__(self, conn: socket.socket, pid: int) -> None:
        self._conn = conn
        self.pid = pid

    def go(self) -> None:
        try:
            self._conn.send(GO)
        finally:
            self._conn.close()

    def abort(self) -> None:
        # EOF instead of "go": the daemon exits without touching the listener.
        self._conn.close()


def fork_daemon(
    argv: Sequence[str],
    listener: socket.socket,
    *,
    directory: str | None = None,
    key: str | None = None,
    timeout: float = REPLY_TIMEOUT,
) -> Forked | None:
    """A daemon forked by the template, or None: the caller then re-executes.

    Spawns the template (for the next start) when none answers.
    """
    directory = directory or template_dir()
    key = key or code_key()
    if not _private_dir(directory):
        if not os.path.exists(directory):
            spawn_template(directory, key)
        return None
    path = socket_path(directory, key)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        conn.settimeout(timeout)
        try:
            conn.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            spawn_template(directory, key)
            return None
        pid, uid, _ = _peer(conn)
        if not _trusted(uid):
            raise TemplateError(f"template socket {path} is served by uid {uid}")
        umask = os.umask(0o022)
        os.umask(umask)
        request = {
            "op": "fork",
            "key": key,
            "argv": list(argv),
            "env": dict(os.environ),
            "cwd": os.getcwd(),
            "umask": umask,
            **_socket_file(listener),
        }
        socket.send_fds(conn, [minijson.dumps(request).encode()], [listener.fileno()])
        try:
            data = conn.recv(4096)
        except TimeoutError:
            _retire_wedged(path, pid)
            raise
        reply = minijson.loads(data) if data else {"error": "template closed the connection"}
        if not isinstance(reply, dict) or not isinstance(reply.get("pid"), int):
            raise TemplateError(str(reply.get("error") if isinstance(reply, dict) else reply))
        return Forked(conn, reply["pid"])
    except (OSError, ValueError, TemplateError):
        conn.close()
        return None


def _retire_wedged(path: str, pid: int) -> None:
    """A template that cannot fork within the timeout is replaced, not waited for."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    if pid > 1:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def template_argv() -> list[str]:
    prog = sys.argv[0] if sys.argv else ""
    if os.path.isabs(prog) and not prog.endswith(".py") and os.access(prog, os.X_OK):
        return [prog, ACTION]
    return [sys.executable, "-m", "shim", ACTION]


def spawn_template(directory: str, key: str) -> int:
    """Start a template in the background (0 when one is already starting).

    Its own session, stdio on /dev/null and no other fds, so it is tied neither to
    containerd nor to this `start`, and re-parented to init when we exit.
    """
    if not enabled():
        return 0
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not _private_dir(directory):
            return 0
        # A template importing (~100-300 ms) holds the lock: don't start a second one.
        fd = _try_lock(directory, key)
        if fd is None:
            return 0
        os.close(fd)
        argv = template_argv()
        env = dict(os.environ)
        env[DIR_ENV] = directory
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
        ]
        return os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True)
    except OSError:
        return 0


def stop_templates(directory: str, timeout: float = 1.0) -> list[int]:
    """Ask every template serving in directory to quit; their pids (for tests, cleanup)."""
    pids: list[int] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return pids
    for name in names:
        if name.endswith(".sock") and not name.startswith("."):
            pid = _send_quit(os.path.join(directory, name), timeout)
            if pid:
                pids.append(pid)
    return pids


def _send_quit(path: str, timeout: float) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(path)
            pid, uid, _ = _peer(conn)
            if not _trusted(uid):
                return 0
            conn.send(minijson.dumps({"op": "quit"}).encode())
            conn.recv(16)  # EOF once it has stopped listening
        except OSError:
            return 0
        return pid


# -- server: the template process ------------------------------------------------

_listener: socket.socket | None = None


def preload() -> None:
    """Import everything a daemon imports at start-up or lazily on common calls."""
    import asyncio  # noqa: F401
    import faulthandler  # noqa: F401
    import random  # noqa: F401
    import tempfile  # noqa: F401
    import urllib.parse  # noqa: F401

    import uvloop  # noqa: F401

    import protocol.proto.cgroups.v1.metrics_pb2
    import protocol.proto.cgroups.v2.metrics_pb2
    import protocol.ttrpc.client  # noqa: F401
    import shim.console
    import shim.daemon
    import shim.mount
    import shim.oom
    import shim.runtime
    import shim.service
    import shim.state
    import shim.stats
    import shim.stdio  # noqa: F401
    from protocol.proto import anyutil  # noqa: F401
    from shim import syscalls

    # dlopen in a forked child can deadlock; and ctypes' lookup is per process.
    syscalls.load_libc()


def _set_name(comm: bytes) -> None:
    from shim import syscalls

    try:
        import ctypes

        buf = ctypes.create_string_buffer(comm[:15])
        syscalls.prctl(PR_SET_NAME, ctypes.addressof(buf))
    except OSError:
        pass


_proc_buffers: list[object] = []


def _set_proc_strings(argv: Sequence[str], env: Mapping[str, str]) -> None:
    """Make /proc/<pid>/cmdline and environ show the daemon's, as a re-exec would.

    ps, containerd's tooling and cleanup scripts find shims by their command line.
    PR_SET_MM_MAP (the CRIU interface) needs no capability as long as the
    executable stays; where it is refused the template's strings stay.
    """
    import ctypes

    from shim import syscalls

    u64 = ctypes.c_uint64

    class MmMap(ctypes.Structure):  # struct prctl_mm_map, <linux/prctl.h>
        _fields_ = [
            *((name, u64) for name in _MM_FIELDS),
            ("auxv", u64),
            ("auxv_size", ctypes.c_uint32),
            ("exe_fd", ctypes.c_uint32),
        ]

    cmdline = b"\0".join(a.encode() for a in argv) + b"\0"
    environ = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()) or b"\0"
    args = ctypes.create_string_buffer(cmdline, len(cmdline))
    envs = ctypes.create_string_buffer(environ, len(environ))
    try:
        with open("/proc/self/stat", "rb") as f:
            # Field N of stat is fields[N - 3]: the list starts after "pid (comm)".
            fields = f.read().rsplit(b")", 1)[1].split()
        values = {name: int(fields[n - 3]) for name, n in _MM_FIELDS.items() if n}
        syscall = ctypes.CDLL(None, use_errno=True).syscall
        syscall.restype = ctypes.c_long
        values["brk"] = syscall(ctypes.c_long(SYS_BRK), ctypes.c_long(0))
        values["arg_start"] = ctypes.addressof(args)
        values["arg_end"] = values["arg_start"] + len(cmdline)
        values["env_start"] = ctypes.addressof(envs)
        values["env_end"] = values["env_start"] + len(environ)
        mm = MmMap(**values, auxv=0, auxv_size=0, exe_fd=0xFFFFFFFF)
        syscalls.prctl(PR_SET_MM, PR_SET_MM_MAP, ctypes.addressof(mm), ctypes.sizeof(mm))
    except (OSError, ValueError, IndexError):
        return
    _proc_buffers.extend((args, envs))  # the kernel reads them from our memory from now on


def _reset_signals() -> None:
    """What a freshly executed interpreter has: defaults, SIGINT raising, PIPE/XFSZ ignored."""
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _become_daemon(conn: socket.socket, listen_fd: int, request: Mapping[str, Any]) -> int:
    """In the grandchild: turn into what `start`'s re-exec would have produced."""
    argv = [str(a) for a in request["argv"]]
    env = {str(k): str(v) for k, v in request["env"].items()}
    if _listener is not None:
        _listener.close()
    _reset_signals()
    os.setpgid(0, 0)
    # fd 3 = the listener, as for a re-exec; the hand-over socket must not be on it.
    if conn.fileno() == 3:
        moved = conn.dup()
        conn.close()
        conn = moved
    if listen_fd != 3:
        os.dup2(listen_fd, 3, inheritable=False)
        os.close(listen_fd)
    keep = sorted({0, 1, 2, 3, conn.fileno()})
    for low, high in zip(keep, [*keep[1:], 1 << 20], strict=True):
        os.closerange(low + 1, high)
    os.chdir(str(request["cwd"]))
    os.umask(int(request["umask"]))
    os.environ.clear()
    os.environ.update(env)
    import random
    import tempfile

    tempfile.tempdir = None  # re-read TMPDIR from the new environment
    random.seed()  # os.register_at_fork does it too; not everything honours that
    sys.argv = argv
    _set_name(SHIM_COMM)
    _set_proc_strings(argv, env)

    conn.settimeout(GO_TIMEOUT)
    conn.send(minijson.dumps({"pid": os.getpid()}).encode())
    answer: bytes | None
    try:
        answer = conn.recv(16)
    except OSError:
        answer = None
    conn.close()
    if answer != GO:
        if answer == b"":
            # `start` is gone without a word (containerd killed it): nobody will
            # serve or remove the socket file it bound for us, so we do.
            _remove_socket_file(request)
        return 0

    from shim.cli import main

    return main(argv)


def _socket_file(listener: socket.socket) -> dict[str, Any]:
    """The listener's socket file and its inode, so a daemon `start` abandoned can
    remove exactly that file (and never one a later `start` bound in its place)."""
    with contextlib.suppress(OSError):
        path = listener.getsockname()
        if isinstance(path, str) and path.startswith("/"):
            return {"socket": path, "socket_ino": os.stat(path).st_ino}
    return {}


def _remove_socket_file(request: Mapping[str, Any]) -> None:
    path, ino = request.get("socket"), request.get("socket_ino")
    if not isinstance(path, str) or not isinstance(ino, int):
        return
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if stat.S_ISSOCK(st.st_mode) and st.st_ino == ino:
            os.unlink(path)


def _fork(conn: socket.socket, listen_fd: int, request: Mapping[str, Any]) -> None:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # A session of our own that we leave at once: the daemon is no session
            # leader (it can never acquire a controlling terminal) and init adopts it.
            os.setsid()
            code = _become_daemon(conn, listen_fd, request) if os.fork() == 0 else 0
        except BaseException:
            # stderr is the template's (/dev/null unless someone is debugging it).
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    os.close(listen_fd)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        conn.send(minijson.dumps({"error": f"fork failed (status {status})"}).encode())


def _handle(conn: socket.socket, key: str) -> bool:
    """One request; False when asked to quit."""
    _, uid, _ = _peer(conn)
    if not _trusted(uid):
        return True
    data, fds, flags, _ = socket.recv_fds(conn, MAX_REQUEST, 1)
    try:
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise TemplateError("truncated request")
        request = minijson.loads(data)
        if not isinstance(request, dict):
            raise TemplateError("bad request")
        if request.get("op") == "quit":
            return False
        if request.get("op") != "fork" or len(fds) != 1:
            raise TemplateError("bad request")
        if request.get("key") != key:
            raise TemplateError(f"template runs {key}, asked for {request.get('key')}")
        listen_fd = fds.pop()
        _fork(conn, listen_fd, request)
    except (TemplateError, ValueError, KeyError, TypeError) as exc:
        conn.send(minijson.dumps({"error": str(exc)}).encode())
    finally:
        for fd in fds:
            os.close(fd)
    return True


def _quit_stale(directory: str, key: str) -> None:
    ours = {f"{key}.sock", f"{key}.lock"}
    for name in os.listdir(directory):
        if name in ours or name.startswith("."):
            continue
        path = os.path.join(directory, name)
        if name.endswith(".sock"):
            _send_quit(path, 1.0)
            _unlink(path)
        elif name.endswith(".lock"):
            _unlink_unlocked(path)


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _unlink_unlocked(path: str) -> None:
    """Remove a lock file nobody holds (a template of that key is starting otherwise)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def _bind(directory: str, key: str) -> socket.socket:
    path = socket_path(directory, key)
    tmp = os.path.join(directory, f".{key}.{os.getpid()}.sock")
    _unlink(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(socket.SOMAXCONN)
        # Atomic: a start never sees a missing socket while a dead one is replaced.
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        _unlink(tmp)
        raise
    return sock


def _try_lock(directory: str, key: str) -> int | None:
    """The template lock for ``key``, taken without waiting; None while another holds it."""
    import fcntl

    fd = os.open(lock_path(directory, key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def serve(directory: str, key: str | None = None) -> int:
    """The template's life: import, freeze, then fork on request until told to quit."""
    global _listener
    import gc

    os.chdir("/")
    key = key or code_key()
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if not _private_dir(directory):
        return 1
    # Held for the template's life.
    lock_fd = _try_lock(directory, key)
    if lock_fd is None:
        return 0  # another template of this code runs or is starting
    _set_name(TEMPLATE_COMM)
    preload()
    if code_key() != key:
        return 0  # the code changed while we imported it: let the next start try again
    _quit_stale(directory, key)
    _listener = _bind(directory, key)
    path = socket_path(directory, key)
    inode = os.stat(path).st_ino

    import threading

    if threading.active_count() != 1:
        raise TemplateError("threads running in the template: forking it is unsafe")
    # Everything imported so far is shared with every daemon; keep the collector
    # from writing to those pages (and un-sharing them) in every child.
    gc.collect()
    gc.freeze()
    try:
        while True:
            try:
                conn, _ = _listener.accept()
            except InterruptedError:
                continue
            with conn:
                try:
                    if not _handle(conn, key):
                        break
                except OSError as exc:
                    if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                        raise
    finally:
        _listener.close()
        try:
            if os.stat(path).st_ino == inode:
                os.unlink(path)
        except OSError:
            pass
        _unlink(lock_path(directory, key))
        os.close(lock_fd)
    return 0


def run_template() -> int:
    return serve(template_dir())
