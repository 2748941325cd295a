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
- The double fork is done ahead of time: the template keeps one *spare*, already
  re-parented, in its own process group, with every other fd closed, blocked in a
  read on a socket pair to the template (zero CPU). A request is passed to it
  whole (the request, the listener and `start`'s connection) and it becomes the
  daemon; the template forks the next spare once that hand-over is over, off
  `start`'s critical path. An unused spare reads EOF and exits when the template
  quits or dies. Without a spare the template double-forks on the request.
- The hand-over is a three-way exchange: the new daemon reports its pid, `start`
  does what must precede serving (cgroup, oom_score_adj) and then says "go". Any
  other outcome (timeout, `start` gone) makes the new daemon exit before it ever
  touches the listener, so a fallback daemon never shares a socket with a twin.
- The socket name carries a digest of the installed code (shim, protocol, the
  interpreter, installed distributions), so an upgrade never forks stale code; a
  new template asks the stale ones to quit.
- Usually `start` does not even do that much: shim/quickstart.py hands the whole
  `start` (argv, environment, cwd, umask, stdio fds) to the template through a
  symlink named for the install, and the spare binds, writes the address, joins
  the shim cgroup, prints on `start`'s stdout and waits for "go" itself. Such a
  request carries no digest, so only a template that watches its code with
  inotify (shim/codewatch.py) offers that link; it quits the moment the code
  changes, and declines (`start` then runs itself) if a change is still queued.

`start` runs the client half, shim.boot.templateclient, not this module. Its top
level imports little all the same (`socket` costs ~5 ms of enum classes, `contextlib`
~1-4 ms): the template imports what it needs when it runs.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

from shim.boot import minijson
from shim.boot.quickstart import FALLBACK, GO, OP, TAKEN, package_root
from shim.boot.rendezvous import peer, private_dir, send_fds, trusted
from shim.boot.templateclient import (
    TemplateError,
    code_key,
    lock_path,
    send_quit,
    socket_path,
    template_dir,
    try_lock,
)

TYPE_CHECKING = False  # typing costs ~3 ms at start-up; mypy honours this name

if TYPE_CHECKING:
    import select
    import socket
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any

    from shim.boot.codewatch import CodeWatch

# "1" (the operator's choice, in containerd's environment): forked daemons offer their
# memory to same-page merging (shim/sys/ksm.py). Anything else, or unset: they do not.
KSM_ENV = "PYSHIM_KSM"
QUICK_PREFIX = OP + b"\0"  # a shim/quickstart.py request, not JSON
# How long a forked daemon waits for `start`'s go-ahead before giving up.
GO_TIMEOUT = 30.0
# Seconds the template waits, with no daemon of its own alive and no request, before it
# exits (its spare with it): a node whose containers are gone keeps no pyshim process,
# so `systemctl restart containerd` finds none left over in containerd's cgroup. Read
# from the environment (containerd's); 0 keeps the template for good.
IDLE_ENV = "PYSHIM_TEMPLATE_IDLE"
DEFAULT_IDLE = 300.0
MAX_REQUEST = 1 << 20
# /proc/<pid>/comm of a direct-exec daemon: the launcher's name, cut to 15 bytes.
SHIM_COMM = b"containerd-shim"
TEMPLATE_COMM = b"pyshim-template"
SPARE_COMM = b"pyshim-spare"
# Appended to the template's command line in a spare's /proc/<pid>/cmdline.
SPARE_ARG = "spare"
# A spare's word to the template once it serves: b"serving\0<pid>\0<inode>\0<path>".
SERVING = b"serving"
MAX_REPORT = 4096
SIGKILL = 9
# Niceness added while a spare is being made (off `start`'s path, but beside it).
SPARE_NICE = 19

PR_SET_NAME = 15
PR_SET_MM = 35
PR_SET_MM_MAP = 14
SYS_BRK = 12  # x86_64


# -- server: the template process ------------------------------------------------

_listener: socket.socket | None = None
# The binary's entry point (shim.boot.cli.main, which runs this template): a daemon
# forked from here runs it with its own argv, as the re-executed binary would.
_main: Callable[[list[str]], int] | None = None


def preload() -> None:
    """Import everything a daemon imports at start-up or lazily on common calls."""
    import asyncio  # noqa: F401
    import faulthandler  # noqa: F401
    import random  # noqa: F401
    import resource  # noqa: F401  (os.wait4 imports it, from C, on its first call)
    import tempfile  # noqa: F401
    import urllib.parse  # noqa: F401

    import uvloop  # noqa: F401

    import protocol.proto.cgroups.v1.metrics_pb2
    import protocol.proto.cgroups.v2.metrics_pb2
    import protocol.proto.ttrpc_pb2  # a server's request envelope (messages.decode_request)
    import protocol.ttrpc.client  # noqa: F401
    import shim.boot.start
    import shim.daemon
    import shim.io.console
    import shim.io.stdio
    import shim.records.state
    import shim.task.mount
    import shim.task.oom
    import shim.task.runtime
    import shim.task.service
    import shim.task.stats  # noqa: F401
    from protocol.proto import anyutil  # noqa: F401
    from shim.reaper import setpriv_path
    from shim.sys import syscalls

    # dlopen in a forked child can deadlock; and ctypes' lookup is per process.
    syscalls.load_libc()
    setpriv_path()  # cached: forked daemons skip the PATH search and file scan


def freeze() -> None:
    """The last step before the template forks anything: work meant to be shared by
    every daemon (warm-ups, caches) goes here, before gc.freeze()."""
    import gc

    from shim.boot import prefork

    prefork.prepare()
    # Everything imported so far is shared with every daemon; keep the collector
    # from writing to those pages (and un-sharing them) in every child.
    gc.collect()
    prefork.immortalize()  # after the collection: garbage made immortal would stay
    prefork.assign_type_versions()
    gc.freeze()
    prefork.release_free_heap()


def _set_name(comm: bytes) -> None:
    from shim.sys import syscalls

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

    from shim.sys import syscalls
    from shim.sys.procfs import stat_fields

    cmdline = b"\0".join(a.encode() for a in argv) + b"\0"
    environ = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()) or b"\0"
    args = ctypes.create_string_buffer(cmdline, len(cmdline))
    envs = ctypes.create_string_buffer(environ, len(environ))
    try:
        mm_map, syscall = syscalls.prctl_mm_map()
        fields = stat_fields("self")  # field N of proc(5) is fields[N - 3]
        values = {name: int(fields[n - 3]) for name, n in syscalls.MM_MAP_FIELDS.items() if n}
        values["brk"] = syscall(ctypes.c_long(SYS_BRK), ctypes.c_long(0))
        values["arg_start"] = ctypes.addressof(args)
        values["arg_end"] = values["arg_start"] + len(cmdline)
        values["env_start"] = ctypes.addressof(envs)
        values["env_end"] = values["env_start"] + len(environ)
        mm = mm_map(**values, auxv=0, auxv_size=0, exe_fd=0xFFFFFFFF)
        syscalls.prctl(PR_SET_MM, PR_SET_MM_MAP, ctypes.addressof(mm), ctypes.sizeof(mm))
    except (OSError, ValueError, IndexError):
        return
    # The kernel reads them from our memory from now on; a spare's own strings may
    # be dropped once the daemon's replace them.
    _proc_buffers[:] = [args, envs]


def _reset_signals() -> None:
    """What a freshly executed interpreter has: defaults, SIGINT raising, PIPE/XFSZ ignored."""
    import contextlib
    import signal

    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _fd_off_3(fd: int) -> int:
    """fd 3 is the listener's: move a received fd that landed there."""
    if fd != 3:
        return fd
    moved = os.dup(fd)
    os.close(fd)
    return moved


def _off_fd3(sock: socket.socket) -> socket.socket:
    """fd 3 is the listener's, as for a re-exec."""
    if sock.fileno() != 3:
        return sock
    import socket

    return socket.socket(fileno=_fd_off_3(sock.detach()))


def _listener_to_fd3(fd: int) -> None:
    if fd == 3:
        os.set_inheritable(3, False)
    else:
        os.dup2(fd, 3, inheritable=False)
        os.close(fd)


def _detach_from_template(
    keep: Sequence[socket.socket], listen_fd: int | None = None, keep_fds: Sequence[int] = ()
) -> list[socket.socket]:
    """In a fresh grandchild: what every daemon needs before its request is known.

    Own process group, fresh signal state, and no fd of the template but stdio,
    ``keep`` (returned, moved off fd 3), ``keep_fds`` (none of them 3) and the
    listener ``listen_fd`` as fd 3.
    """
    global _listener
    if _listener is not None:
        # Through the object: a stray close of fd 3 later would hit the listener.
        _listener.close()
        _listener = None
    _reset_signals()
    os.setpgid(0, 0)
    kept = [_off_fd3(sock) for sock in keep]
    fds = {0, 1, 2, *(s.fileno() for s in kept), *keep_fds}
    if listen_fd is not None:
        _listener_to_fd3(listen_fd)
        fds.add(3)
    ordered = sorted(fds)
    for low, high in zip(ordered, [*ordered[1:], 1 << 20], strict=True):
        os.closerange(low + 1, high)
    return kept


def _become_daemon(
    conn: socket.socket,
    listen_fd: int,
    request: Mapping[str, Any],
    link: socket.socket | None = None,
) -> int:
    """In the grandchild: turn into what `start`'s re-exec would have produced.

    ``link`` is a spare's socket to the template (the spare is detached already),
    closed once the hand-over is over: the template forks the next spare on that
    EOF, when `start` is done with us.
    """
    argv = [str(a) for a in request["argv"]]
    env = {str(k): str(v) for k, v in request["env"].items()}
    if link is None:
        (conn,) = _detach_from_template([conn], listen_fd)
    else:
        conn = _off_fd3(conn)
        _listener_to_fd3(listen_fd)
    os.chdir(str(request["cwd"]))
    os.umask(int(request["umask"]))
    _assume(argv, env)

    answer = _await_go(conn, minijson.dumps({"pid": os.getpid()}).encode(), link, serving=request)
    if answer != GO:
        if answer == b"":
            # `start` is gone without a word (containerd killed it): nobody will
            # serve or remove the socket file it bound for us, so we do.
            _remove_socket_file(request)
        return 0
    return _serve_as_daemon(argv, env)


def _assume(argv: list[str], env: Mapping[str, str]) -> None:
    """Take on the daemon's environment, argv, comm and /proc strings, as a re-exec."""
    _take_environment(env)
    sys.argv = argv
    _set_name(SHIM_COMM)
    _set_proc_strings(argv, env)


def _await_go(
    conn: socket.socket,
    message: bytes,
    link: socket.socket | None,
    meanwhile: Callable[[], object] | None = None,
    serving: Mapping[str, Any] | None = None,
) -> bytes | None:
    """Tell `start` ``message``, run ``meanwhile``, and wait for its answer: GO, b""
    when `start` is gone (EOF, or closed before reading), None on a timeout or other
    error. Closes the connection and a spare's link to the template, telling the
    template first, after a GO, which socket file we serve (``serving``: its
    "socket" and "socket_ino"), so that it can remove the file if we die without."""
    conn.settimeout(GO_TIMEOUT)
    answer: bytes | None
    try:
        conn.send(message)
        if meanwhile is not None:
            meanwhile()
        try:
            answer = conn.recv(16)
        except ConnectionResetError:
            # `start` closed with a message still unread (the template's "taken" may
            # arrive after our answer): the kernel reports that reset once, ahead of
            # what `start` sent before it closed, "go" included. EOF if nothing.
            answer = conn.recv(16)
    except (BrokenPipeError, ConnectionResetError):
        answer = b""
    except OSError:
        answer = None
    conn.close()
    if link is not None:
        if answer == GO and serving is not None:
            _report_serving(link, serving)
        link.close()
    return answer


def _report_serving(link: socket.socket, socket_file: Mapping[str, Any]) -> None:
    path, ino = socket_file.get("socket"), socket_file.get("socket_ino")
    if not isinstance(path, str) or not isinstance(ino, int):
        return
    try:  # noqa: SIM105 (contextlib: see the module docstring)
        link.send(b"\0".join([SERVING, b"%d" % os.getpid(), b"%d" % ino, os.fsencode(path)]))
    except OSError:
        pass  # the template is gone: nobody to tell


def _serve_as_daemon(argv: list[str], env: Mapping[str, str]) -> int:
    from shim.sys import ksm

    if env.get(KSM_ENV) == "1":
        ksm.mark_after_start()
    if _main is None:
        raise TemplateError("no entry point to run the daemon (serve() sets it)")
    return _main(argv)


def _start_here(
    conn: socket.socket,
    stdio: Sequence[int],
    data: bytes,
    link: socket.socket | None = None,
) -> int:
    """In a spare, or a grandchild forked for the request: run the `start` that
    shim/quickstart.py handed over, with its stdio, and serve as its daemon.

    Answers FALLBACK, before doing anything, to what the ordinary path must handle
    (the flags it would reject or print for); then "0" or "1", `start`'s status,
    once the address (or error) is written to its stdout (stderr). Serves only
    after "go", as `_become_daemon`.
    """
    from shim.boot import flags, quickstart, start
    from shim.sys.fdio import read_all, write_all

    stdin_fd, out_fd, err_fd = (_fd_off_3(fd) for fd in stdio)
    if link is None:
        (conn,) = _detach_from_template([conn], keep_fds=(stdin_fd, out_fd, err_fd))
    else:
        conn = _off_fd3(conn)

    def reply(answer: bytes) -> None:
        try:  # noqa: SIM105 (contextlib: see the module docstring)
            conn.send(answer)
        except OSError:
            pass  # `start` is gone: containerd sees it fail

    try:
        request = quickstart.Request.decode(data)
        argv = request.str_argv()
        opts = flags.parse_flags(argv[1:])
    except (ValueError, flags.FlagError, flags.HelpRequested):
        reply(FALLBACK)
        return 0
    env = request.environ()
    if not flags.runs_start(opts) or env.get(quickstart.SCHED_CORE_ENV):
        reply(FALLBACK)
        return 0
    try:
        os.chdir(request.cwd)
        os.umask(request.umask)
        bundle = os.fsdecode(request.cwd)
        bound = start.start_here(opts, read_all(stdin_fd, start.MAX_STDIN), bundle, request.parent)
    except Exception as exc:  # the contract: a message on stderr and exit 1 (shim.boot.cli)
        quickstart.fail_to(err_fd, str(exc) or type(exc).__name__)
        reply(b"1")
        return 0
    try:
        # The inode first: the file `_remove_socket_file` may remove is this one only.
        inode = os.stat(bound.path).st_ino if bound.listener is not None else 0
        write_all(out_fd, bound.answer())
    except OSError:
        bound.abandon()  # containerd stopped reading: it will not use this address
        reply(b"1")
        return 0
    for fd in (stdin_fd, out_fd, err_fd):
        os.close(fd)
    if bound.listener is None:
        # A live shim of the same group serves the address. `start` says go after
        # any "0": wait for it, so that it never finds us gone first.
        _await_go(conn, b"0", link)
        return 0
    socket_file = {"socket": bound.path, "socket_ino": inode}
    _listener_to_fd3(bound.listener.detach())
    daemon_argv = start.daemon_argv(opts, argv[0])

    # While `start` exits and containerd reads the address: not needed before "go".
    assume = lambda: _assume(daemon_argv, env)  # noqa: E731
    if _await_go(conn, b"0", link, meanwhile=assume, serving=socket_file) != GO:
        # `start` died before saying go (or never will): containerd has no daemon
        # here; the socket file is ours to remove (the address file is harmless).
        _remove_socket_file(socket_file)
        return 0
    return _serve_as_daemon(daemon_argv, env)


def _remove_socket_file(request: Mapping[str, Any]) -> None:
    path, ino = request.get("socket"), request.get("socket_ino")
    if not isinstance(path, str) or not isinstance(ino, int):
        return
    try:
        st = os.stat(path)
        if stat.S_ISSOCK(st.st_mode) and st.st_ino == ino:
            os.unlink(path)
    except OSError:
        pass


def _double_fork(child: Callable[[], int], nice: int = 0) -> bool:
    """Run child() in a grandchild re-parented to init, in a session it does not lead
    (so it can never acquire a controlling terminal); False if that failed.

    A ``nice`` increment applies from the intermediate child on.
    """
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setsid()
            if nice:
                os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + nice)
            code = child() if os.fork() == 0 else 0
        except BaseException:
            # stderr is the template's (/dev/null unless someone is debugging it).
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status == 0


def _fork(conn: socket.socket, listen_fd: int, request: Mapping[str, Any]) -> None:
    """No spare: double-fork the daemon now, on `start`'s clock."""
    try:
        ok = _double_fork(lambda: _become_daemon(conn, listen_fd, request))
    finally:
        os.close(listen_fd)
    if not ok:
        conn.send(minijson.dumps({"error": "fork failed"}).encode())


def _fork_start(conn: socket.socket, stdio: Sequence[int], data: bytes) -> bool:
    """No spare: double-fork the quick start's daemon now, on `start`'s clock; False
    (and FALLBACK sent) when that failed."""
    if _double_fork(lambda: _start_here(conn, stdio, data)):
        return True
    conn.send(FALLBACK)  # nothing was done: `start` does it itself
    return False


def _spare_main(link: socket.socket, template_end: socket.socket, priority: int | None) -> int:
    """A spare's life: detach, then block until the template hands it a request.

    EOF (the template quit or died) ends it; so does anything malformed. With a
    ``priority``, it was set up niced and takes the template's priority back first.
    """
    import socket

    template_end.close()
    (link,) = _detach_from_template([link])
    os.chdir("/")
    _set_name(SPARE_COMM)
    try:
        with open("/proc/self/cmdline", "rb") as f:
            own = [a.decode() for a in f.read().split(b"\0")[:-1]]
        _set_proc_strings([*own, SPARE_ARG], os.environ)
    except (OSError, UnicodeDecodeError):
        pass
    _rehearse()
    if priority is not None:
        os.setpriority(os.PRIO_PROCESS, 0, priority)
    link.setblocking(True)
    try:
        data, fds, flags, _ = socket.recv_fds(link, MAX_REQUEST, 4)
    except OSError:
        return 0
    quick = data.startswith(QUICK_PREFIX)
    if (
        not data
        or len(fds) != (4 if quick else 2)
        or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC)
    ):
        for fd in fds:
            os.close(fd)
        return 0
    if quick:
        conn = socket.socket(fileno=fds[0])
        return _start_here(conn, fds[1:], data, link)
    listen_fd, conn_fd = fds
    conn = socket.socket(fileno=conn_fd)
    os.set_inheritable(conn_fd, False)
    return _become_daemon(conn, listen_fd, minijson.loads(data), link)


def _take_environment(env: Mapping[str, str]) -> None:
    """Replace the environment, and what the stdlib cached from the old one.

    Only what differs is set or removed: `start` runs with the environment the
    template had (both come from containerd), so a hand-over changes a few variables,
    and rewriting every one of them copies ~0.5 MB of template pages into every
    daemon (bench/README, "What a daemon's own steps copy")."""
    import random
    import tempfile

    current = os.environ
    for key in [k for k in current if k not in env]:
        del current[key]
    for key, value in env.items():
        if current.get(key) != value:
            current[key] = value
    tempfile.tempdir = None  # re-read TMPDIR from the new environment
    random.seed()  # os.register_at_fork does it too; not everything honours that


def _rehearse() -> None:
    """Run the hand-over's costly steps once while idle, on the spare's own data.

    Their first run takes the copy-on-write faults of the pages they write (~1 ms
    at hand-over otherwise); the daemon this spare becomes writes those pages anyway.
    So does the daemon's start-up (shim.daemon.rehearse).
    """
    from shim import daemon

    env = dict(os.environ)
    minijson.loads(minijson.dumps({"env": env, "argv": sys.argv}))
    _take_environment(env)
    daemon.rehearse()


def _make_spare() -> socket.socket | None:
    """Fork a spare; the template's end of its socket pair, or None.

    This runs while the daemon just handed over and containerd start the container:
    its second fork and set-up run niced, so they take what CPU those leave. Only
    root may take the priority back, which the spare must before it serves.
    """
    import socket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    priority = os.getpriority(os.PRIO_PROCESS, 0) if os.geteuid() == 0 else None
    try:
        ok = _double_fork(
            lambda: _spare_main(theirs, ours, priority),
            nice=SPARE_NICE if priority is not None else 0,
        )
    except OSError:
        ok = False
    theirs.close()
    if not ok:
        ours.close()
        return None
    return ours


class _Spares:
    """The template's spare: at most one idle, and at most one handing over.

    The next spare is forked only when the previous one's hand-over is over (EOF on
    its link) or after a request served without one, never in a loop: a spare that
    dies idle is replaced after the next request.
    """

    def __init__(self) -> None:
        self.idle: socket.socket | None = None
        self.busy: socket.socket | None = None
        self.wanted = True

    def links(self) -> list[socket.socket]:
        return [s for s in (self.idle, self.busy) if s is not None]

    def refill(self) -> None:
        if self.wanted and self.idle is None and self.busy is None:
            self.wanted = False
            self.idle = _make_spare()

    def readable(self, link: socket.socket, on_report: Callable[[bytes], None]) -> None:
        """A busy spare's report (what it serves), or EOF on a link."""
        import socket

        while True:
            try:
                data = link.recv(MAX_REPORT, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.closed(link)
                return
            on_report(data)

    def closed(self, link: socket.socket) -> None:
        """EOF on a link: an idle spare died, or a busy one is done."""
        link.close()
        if link is self.idle:
            self.idle = None
        elif link is self.busy:
            self.busy = None
            self.wanted = True

    def hand_over(self, data: bytes, fds: Sequence[int]) -> bool:
        spare = self.idle
        if spare is None:
            self.wanted = True
            return False
        self.idle = None
        try:
            send_fds(spare, data, fds)
        except OSError:
            spare.close()
            self.wanted = True
            return False
        if self.busy is not None:
            self.busy.close()
        self.busy = spare
        return True

    def close(self) -> None:
        for link in self.links():
            link.close()  # an idle spare reads EOF and exits
        self.idle = self.busy = None


class _Janitor:
    """Removes the socket file of a daemon that died without removing it.

    A SIGKILLed daemon runs nothing more, and containerd's clean-up (the shim's
    `delete`) may never run either: containerd runs it in the bundle, which a task
    delete of the dead shim may have removed first. Each daemon a spare became is
    watched through a pidfd in the template's poll set (no polling); at its death
    its socket file goes if it is still that file and nothing listens on it.
    """

    def __init__(self, poller: select.poll) -> None:
        self._poller = poller
        self.watched: dict[int, tuple[str, int]] = {}

    def adopt(self, report: bytes) -> None:
        parts = report.split(b"\0", 3)
        if len(parts) != 4 or parts[0] != SERVING:
            return
        try:
            pid, ino, path = int(parts[1]), int(parts[2]), os.fsdecode(parts[3])
        except ValueError:
            return
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            _remove_if_dead(path, ino)  # it died before we could watch it
            return
        except OSError:
            return  # out of fds: its `delete` is left to do it
        self.watched[fd] = (path, ino)
        self._poller.register(fd, 1)  # POLLIN: the process exited

    def exited(self, fd: int) -> None:
        path, ino = self.watched.pop(fd)
        self._poller.unregister(fd)
        os.close(fd)
        _remove_if_dead(path, ino)

    def close(self) -> None:
        for fd in self.watched:
            os.close(fd)
        self.watched.clear()


def _remove_if_dead(path: str, ino: int) -> None:
    from shim.boot.start import remove_if_dead

    try:  # noqa: SIM105 (contextlib: see the module docstring)
        remove_if_dead(path, ino)
    except OSError:
        pass


def _handle(conn: socket.socket, key: str, spares: _Spares, watch: CodeWatch | None = None) -> bool:
    """One request; False when asked to quit (or when the code changed under us)."""
    import socket

    _, uid, _ = peer(conn)
    if not trusted(uid):
        return True
    data, fds, flags, _ = socket.recv_fds(conn, MAX_REQUEST, 3)
    quick = data.startswith(QUICK_PREFIX)
    try:
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise TemplateError("truncated request")
        if quick:
            if watch is None or watch.changed():
                # No digest in the request: only a watched template can vouch for
                # its code. `start` runs the ordinary path (which spawns a fresh one).
                conn.send(FALLBACK)
                return watch is None
            if len(fds) != 3:
                raise TemplateError("bad request")
            if spares.hand_over(data, [conn.fileno(), *fds]) or _fork_start(conn, fds, data):
                # `start` now waits for the spare (longer than for us). The spare may
                # have answered already: `start` takes the messages in either order.
                conn.send(TAKEN)
            return True
        request = minijson.loads(data)
        if not isinstance(request, dict):
            raise TemplateError("bad request")
        if request.get("op") == "quit":
            return False
        if request.get("op") != "fork" or len(fds) != 1:
            raise TemplateError("bad request")
        if request.get("key") != key:
            raise TemplateError(f"template runs {key}, asked for {request.get('key')}")
        for field in ("argv", "env", "cwd", "umask"):
            if field not in request:
                raise TemplateError(f"request without {field}")
        listen_fd = fds.pop()
        if spares.hand_over(data, [listen_fd, conn.fileno()]):
            os.close(listen_fd)
        else:
            _fork(conn, listen_fd, request)
    except (TemplateError, ValueError, KeyError, TypeError) as exc:
        if quick:
            conn.send(FALLBACK)
        else:
            conn.send(minijson.dumps({"error": str(exc)}).encode())
    finally:
        for fd in fds:
            os.close(fd)
    return True


def _quit_stale(directory: str, key: str) -> None:
    ours = {f"{key}.sock", f"{key}.lock"}
    names = os.listdir(directory)
    for name in names:
        if name in ours or name.startswith("."):
            continue
        path = os.path.join(directory, name)
        if name.endswith(".sock"):
            send_quit(path, 1.0)
            _unlink(path)
        elif name.endswith(".lock"):
            _unlink_unlocked(path)
    for name in names:
        path = os.path.join(directory, name)
        if name.endswith(".link") and not os.path.exists(path):
            _unlink(path)  # named a template that is gone


def _unlink(path: str) -> None:
    try:  # noqa: SIM105 (contextlib: see the module docstring)
        os.unlink(path)
    except OSError:
        pass


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
    import socket

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


def idle_timeout_ms(env: Mapping[str, str]) -> int | None:
    """IDLE_ENV as poll(2)'s timeout; None for no timeout (0, or not a number >= 0)."""
    raw = env.get(IDLE_ENV)
    try:
        seconds = DEFAULT_IDLE if raw is None else float(raw)
    except ValueError:
        seconds = DEFAULT_IDLE
    if not seconds >= 0:  # NaN too
        seconds = DEFAULT_IDLE
    return int(seconds * 1000) if 0 < seconds < float("inf") else None


def _serve_requests(
    listener: socket.socket, key: str, watch: CodeWatch | None = None, idle_ms: int | None = None
) -> None:
    """Accept requests until told to quit, until the code changes, or until idle for
    ``idle_ms`` with no daemon of ours alive; blocked in poll(2) in between."""
    import select

    spares = _Spares()
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    if watch is not None:
        poller.register(watch.fileno(), select.POLLIN)
    janitor = _Janitor(poller)
    try:
        while True:
            spares.refill()
            watched = {link.fileno(): link for link in spares.links()}
            for fd in watched:
                poller.register(fd, select.POLLIN)
            # While a daemon we made lives (its pidfd is watched) or a spare is handing
            # over, no timeout: the template is kept for the next start of that node.
            timeout = None if janitor.watched or spares.busy is not None else idle_ms
            try:
                events = poller.poll(timeout)
            finally:
                for fd in watched:
                    poller.unregister(fd)
            if not events and timeout is not None:
                return  # idle: the next start spawns a template again
            for fd, _ in events:
                if fd in watched:
                    spares.readable(watched[fd], janitor.adopt)
                elif fd in janitor.watched:
                    janitor.exited(fd)
            if watch is not None and watch.changed():
                return  # stale: the next start spawns a template of the new code
            if not any(fd == listener.fileno() for fd, _ in events):
                continue
            try:
                conn, _ = listener.accept()
            except InterruptedError:
                continue
            with conn:
                try:
                    if not _handle(conn, key, spares, watch):
                        return
                except OSError as exc:
                    if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                        raise
    finally:
        spares.close()
        janitor.close()


def serve(directory: str, key: str | None = None, *, main: Callable[[list[str]], int]) -> int:
    """The template's life: import, freeze, then fork on request until told to quit.

    ``main`` is the binary's entry point, which forked daemons run with their argv."""
    global _listener, _main

    _main = main

    os.chdir("/")
    key = key or code_key()
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if not private_dir(directory):
        return 1
    # Held for the template's life.
    lock_fd = try_lock(directory, key)
    if lock_fd is None:
        return 0  # another template of this code runs or is starting
    _set_name(TEMPLATE_COMM)
    preload()
    from shim.boot.codewatch import watch_code

    # Before the check below: a change after it is an event on this watch.
    watch = watch_code(package_root())
    if code_key() != key:
        return 0  # the code changed while we imported it: let the next start try again
    _quit_stale(directory, key)

    import threading

    if threading.active_count() != 1:
        raise TemplateError("threads running in the template: forking it is unsafe")
    # Before the socket appears: a start that finds it gets an answer at once, not
    # after the freeze's work (hundreds of ms where objects are made immortal).
    freeze()
    _listener = listener = _bind(directory, key)
    path = socket_path(directory, key)
    inode = os.stat(path).st_ino
    link = quick_link(directory, key) if watch is not None else None
    try:
        _serve_requests(listener, key, watch, idle_timeout_ms(os.environ))
    finally:
        listener.close()
        _listener = None
        if link is not None:
            _remove_link(link, key)
        try:
            if os.stat(path).st_ino == inode:
                os.unlink(path)
        except OSError:
            pass
        _unlink(lock_path(directory, key))
        os.close(lock_fd)
        if watch is not None:
            watch.close()
    return 0


def quick_link(directory: str, key: str) -> str | None:
    """Point this install's link (shim/quickstart.py) at our socket; its path, or None.

    A symlink: `start` connects through it without knowing the code digest.
    """
    from shim.boot import quickstart

    link = quickstart.link_path(directory, quickstart.install_key(sys.executable, package_root()))
    tmp = os.path.join(directory, f".{key}.{os.getpid()}.link")
    try:
        _unlink(tmp)
        os.symlink(os.path.basename(socket_path(directory, key)), tmp)
        os.rename(tmp, link)
    except OSError:
        _unlink(tmp)
        return None
    return link


def _remove_link(link: str, key: str) -> None:
    """Remove the link if it still names our socket (a newer template may have taken it)."""
    try:
        if os.readlink(link) == os.path.basename(socket_path("", key)):
            os.unlink(link)
    except OSError:
        pass


def run_template(main: Callable[[list[str]], int]) -> int:
    return serve(template_dir(), main=main)
