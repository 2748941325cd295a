"""Where `start` and the fork template meet, and how each trusts the other.

Shared by the quick path's client (shim.boot.quickstart), `start`'s own request
(shim.boot.templateclient) and the template (shim.boot.template): the template
directory and the variables that name or disable it, the checks that a directory and
a peer are ours, file descriptors over SCM_RIGHTS, and the retirement of a template
that stopped answering (one only starved of a core is waited for). Also SHA-256
without hashlib, which names the template's link and socket and the shim's own
socket. The quick path loads this module, so it imports builtins only (`os` alone
costs ~1.2 ms).
"""

# No `from __future__ import annotations` (~0.1 ms): typing-only names are strings.
import _socket
import posix
import sys

TYPE_CHECKING = False  # typing costs ~3 ms at start-up; mypy honours this name

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

DIR_ENV = "PYSHIM_TEMPLATE_DIR"
DEFAULT_DIR = "/run/pyshim/template"
# "0": `start` always re-executes the daemon (and never spawns a template).
ENABLE_ENV = "PYSHIM_TEMPLATE"
_INT = 4
_S_IFMT, _S_IFDIR = 0o170000, 0o040000


def sha256(data: bytes = b"") -> "Any":
    """A SHA-256 hash object, without hashlib: it would load OpenSSL (~4 ms)."""
    try:
        from _sha256 import sha256 as new  # type: ignore[import-not-found]
    except ImportError:  # 3.12+ keeps the SHA-2 family in one module
        from _sha2 import sha256 as new  # type: ignore[import-not-found]
    return new(data)


def private_dir(directory: str) -> bool:
    """Ours alone: a socket in a directory others can write to could be anyone's."""
    try:
        st = posix.lstat(directory)
    except OSError:
        return False
    return (
        st.st_mode & _S_IFMT == _S_IFDIR and st.st_uid == posix.geteuid() and not st.st_mode & 0o077
    )


def send_fds(sock: _socket.socket, data: bytes, fds: "Sequence[int]") -> None:
    """socket.send_fds without importing socket (and array)."""
    rights = b"".join(fd.to_bytes(_INT, sys.byteorder) for fd in fds)
    sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])


def peer(sock: _socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the other end."""
    raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 3 * _INT)
    pid, uid, gid = (int.from_bytes(raw[i : i + _INT], sys.byteorder) for i in (0, 4, 8))
    return pid, uid, gid


def trusted(uid: int) -> bool:
    """Root, or who we run as."""
    return uid in (0, posix.geteuid())


# A template that has not answered within its reply timeout but is runnable (waiting
# for a core on an overloaded node) or in the kernel is starved, not wedged: it gets up
# to this many more timeouts. Retiring it costs the start a re-exec and the node a new
# template's imports, which an overloaded node can least afford.
BUSY_ROUNDS = 9


def late_reply(conn: _socket.socket, path: str, pid: int, bufsize: int) -> "bytes | None":
    """The template's answer once ``conn``'s timeout passed without one: waited for
    while the template (``pid``, serving ``path``) is busy, for at most BUSY_ROUNDS
    more timeouts; b"" when the connection ends; None when it is wedged, and then
    retired (retire_wedged)."""
    for _ in range(BUSY_ROUNDS):
        if not busy(pid):
            break
        try:
            return conn.recv(bufsize)
        except TimeoutError:
            continue
        except OSError:
            return b""
    retire_wedged(path, pid)
    return None


def busy(pid: int) -> bool:
    """Whether ``pid`` is runnable or in an uninterruptible wait (state R or D in
    /proc/PID/stat): using or waiting for the CPU or the kernel, not blocked on us."""
    # Only after a timeout: the quick path's imports stay builtins at start-up.
    from shim.sys.procfs import stat_fields

    try:
        return stat_fields(pid)[:1] in ([b"R"], [b"D"])
    except (OSError, ValueError):
        return False


def retire_wedged(path: str, pid: int) -> None:
    """A template that did not answer in time is replaced, not waited for: its socket
    (``path`` or, for a link, the socket it names) goes, and it is SIGKILLed."""
    if path.endswith(".link"):
        try:
            target = posix.readlink(path)
            posix.unlink(path)
            path = f"{path.rsplit('/', 1)[0]}/{target}"
        except OSError:
            pass
    try:  # noqa: SIM105 (contextlib costs ~1-4 ms to import)
        posix.unlink(path)
    except OSError:
        pass
    if pid > 1:
        try:  # noqa: SIM105
            posix.kill(pid, 9)
        except OSError:
            pass
