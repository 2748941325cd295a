"""The template's client side, and what names a template: what `start` runs.

`start` asks the template (shim.boot.template) for a daemon over its socket
(`fork_daemon`), spawns one when none answers (`spawn_template`) and otherwise
falls back to a re-exec. The template's socket, lock and the digest of the code it
runs (`code_key`, which shim.boot.codewatch watches) are named here, for both sides.

`start` imports this module, so its top level imports only what `start` already has
(`_socket`, not `socket`, whose enum classes cost ~5 ms; no `contextlib`, ~1-4 ms).
"""

from __future__ import annotations

import _socket
import os
import sys

from shim.boot import minijson
from shim.boot.quickstart import GO, REPLY_TIMEOUT, package_root
from shim.boot.rendezvous import (
    DEFAULT_DIR,
    DIR_ENV,
    ENABLE_ENV,
    late_reply,
    peer,
    private_dir,
    send_fds,
    trusted,
)

TYPE_CHECKING = False  # typing costs ~3 ms at start-up; mypy honours this name

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from typing import Any

ACTION = "template"
# What code_key digests (and shim/boot/codewatch.py watches): our packages' code files,
CODE_PACKAGES = ("shim", "protocol")
CODE_EXTENSIONS = (".py", ".so")
# and the distributions installed in these directories.
SITE_DIR_NAMES = ("site-packages", "dist-packages")


class TemplateError(Exception):
    pass


# -- shared by both halves -------------------------------------------------------


def template_dir() -> str:
    return os.environ.get(DIR_ENV) or DEFAULT_DIR


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1") != "0"


def site_dirs(paths: Iterable[str]) -> list[str]:
    """The entries of ``paths`` that hold installed distributions."""
    return [p for p in paths if os.path.basename(p) in SITE_DIR_NAMES]


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
        elif entry.name.endswith(CODE_EXTENSIONS):
            yield name, entry.stat()


def code_key() -> str:
    """Digest of everything a forked daemon would run: a change means a new template.

    Stats only (~1 ms): sizes and mtimes of our sources, the interpreter, and the
    names (hence versions) of the installed distributions.
    """
    from shim.boot.rendezvous import sha256

    h = sha256()
    # realpath: the launcher and a venv wrapper name the same interpreter differently.
    h.update(f"{sys.version}\0{os.path.realpath(sys.executable)}\n".encode())
    root = package_root()
    for top in CODE_PACKAGES:
        for name, st in _code_files(root, top):
            h.update(f"{name}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
    for path in site_dirs(sys.path):
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


def _seqpacket() -> _socket.socket:
    return _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)


# -- client: `start` -------------------------------------------------------------


class Forked:
    """A daemon forked by the template, waiting for `go()` before it serves."""

    def __init__(self, conn: _socket.socket, pid: int) -> None:
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
    listener: _socket.socket,
    *,
    directory: str | None = None,
    key: str | None = None,
    timeout: float = REPLY_TIMEOUT,
    meanwhile: Callable[[], object] | None = None,
) -> Forked | None:
    """A daemon forked by the template, or None: the caller then re-executes.

    Spawns the template (for the next start) when none answers. ``meanwhile`` runs
    once the request is sent, while the template hands it over (not at all when the
    request could not be sent); its exceptions propagate, and the daemon then exits
    without serving.
    """
    directory = directory or template_dir()
    key = key or code_key()
    if not private_dir(directory):
        if not os.path.exists(directory):
            spawn_template(directory, key)
        return None
    path = socket_path(directory, key)
    conn = _seqpacket()
    try:
        conn.settimeout(timeout)
        try:
            conn.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            spawn_template(directory, key)
            return None
        pid, uid, _ = peer(conn)
        if not trusted(uid):
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
        send_fds(conn, minijson.dumps(request).encode(), [listener.fileno()])
    except (OSError, ValueError, TemplateError):
        conn.close()
        return None
    if meanwhile is not None:
        try:
            meanwhile()
        except BaseException:
            conn.close()  # EOF instead of "go": the daemon exits without serving
            raise
    try:
        try:
            data = conn.recv(4096)
        except TimeoutError:
            late = late_reply(conn, path, pid, 4096)
            if late is None:
                raise
            data = late
        reply = minijson.loads(data) if data else {"error": "template closed the connection"}
        if not isinstance(reply, dict) or not isinstance(reply.get("pid"), int):
            raise TemplateError(str(reply.get("error") if isinstance(reply, dict) else reply))
        return Forked(conn, reply["pid"])
    except (OSError, ValueError, TemplateError):
        conn.close()
        return None


def _socket_file(listener: _socket.socket) -> dict[str, Any]:
    """The listener's socket file and its inode, so a daemon `start` abandoned can
    remove exactly that file (and never one a later `start` bound in its place)."""
    try:
        path = listener.getsockname()
        if isinstance(path, str) and path.startswith("/"):
            return {"socket": path, "socket_ino": os.stat(path).st_ino}
    except OSError:
        pass
    return {}


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
        if not private_dir(directory):
            return 0
        # A template importing (~100-300 ms) holds the lock: don't start a second one.
        fd = try_lock(directory, key)
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
            pid = send_quit(os.path.join(directory, name), timeout)
            if pid:
                pids.append(pid)
    return pids


def send_quit(path: str, timeout: float) -> int:
    conn = _seqpacket()
    try:
        conn.settimeout(timeout)
        conn.connect(path)
        pid, uid, _ = peer(conn)
        if not trusted(uid):
            return 0
        conn.send(minijson.dumps({"op": "quit"}).encode())
        conn.recv(16)  # EOF once it has stopped listening
    except OSError:
        return 0
    finally:
        conn.close()
    return pid


def try_lock(directory: str, key: str) -> int | None:
    """The template lock for ``key``, taken without waiting; None while another holds it."""
    import fcntl

    fd = os.open(lock_path(directory, key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
