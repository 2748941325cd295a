"""The binary's first step: `start` handed whole to the fork template.

containerd runs `start` once per container and waits for it, so what it costs is
start-up latency. The template (shim/template.py) has every module imported; its
spare binds the shim socket, writes the address, joins the shim cgroup, prints the
address on our stdout and becomes the daemon. This side only forwards what `start`
was given (argv, environment, working directory, umask, containerd's pid and the
stdin/stdout/stderr file descriptors) and exits with the spare's status, sending
"go" first so that a `start` killed meanwhile leaves no daemon serving.

It imports builtins only: `os` alone costs ~1.2 ms, the ordinary path ~4 ms of
imports plus ~1 ms to digest the code. Every other action, and a `start` no template
takes on (none running, code changed, SCHED_CORE), runs shim.boot.cli as before, which
also spawns the template for the next start.
"""

# No `from __future__ import annotations`: importing __future__ costs ~0.1 ms here,
# so the annotations that name typing-only objects are strings.
import _socket
import posix
import sys

from shim import RUNTIME_NAME
from shim.boot.rendezvous import (
    DEFAULT_DIR,
    DIR_ENV,
    ENABLE_ENV,
    late_reply,
    peer,
    private_dir,
    send_fds,
    sha256,
    trusted,
)

OP = b"start"
FALLBACK = b"fallback"
TAKEN = b"taken"  # the template handed the request on: from now on, its holder answers
GO = b"go"  # `start` is done: serve
# For the template's own answer (TAKEN, or a fork's pid): long enough for a fork
# under heavy load (a fork takes ~2-5 ms here), short enough that a wedged template
# costs one start less than a direct re-exec would.
REPLY_TIMEOUT = 1.0
# For the spare that has the request: its whole start (bind under the socket
# directory's lock, O_SYNC address file, cgroup) takes a few ms, more on a busy disk.
SPARE_TIMEOUT = 10.0
# A core-scheduling cookie must exist before the daemon does: start makes it and
# re-executes (shim.boot.start.sched_core_create).
SCHED_CORE_ENV = "SCHED_CORE"


class Request:
    """A start request: what `start` was given. Encoded NUL-separated (argv and
    environment entries are C strings), so neither side needs a JSON codec."""

    def __init__(
        self,
        argv: list[bytes],
        env: list[bytes],
        cwd: bytes,
        umask: int,
        parent: int,
    ) -> None:
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.umask = umask
        self.parent = parent

    def encode(self) -> bytes:
        head = [OP, self.cwd, b"%d" % self.umask, b"%d" % self.parent, b"%d" % len(self.argv)]
        return b"\0".join([*head, *self.argv, *self.env])

    @classmethod
    def decode(cls, data: bytes) -> "Request":
        parts = data.split(b"\0")
        if len(parts) < 5 or parts[0] != OP:
            raise ValueError("not a start request")
        cwd, umask, parent, argc = parts[1], int(parts[2]), int(parts[3]), int(parts[4])
        if argc < 1 or len(parts) < 5 + argc or not cwd.startswith(b"/"):
            raise ValueError("malformed start request")
        env = parts[5 + argc :]
        if any(b"=" not in entry for entry in env):
            raise ValueError("malformed environment in start request")
        return cls(parts[5 : 5 + argc], env, cwd, umask, parent)

    def environ(self) -> dict[str, str]:
        """The environment as os.environ would decode it."""
        out: dict[str, str] = {}
        for entry in self.env:
            key, _, value = entry.partition(b"=")
            out[key.decode(errors="surrogateescape")] = value.decode(errors="surrogateescape")
        return out

    def str_argv(self) -> list[str]:
        return [a.decode(errors="surrogateescape") for a in self.argv]


def install_key(executable: str, root: str) -> str:
    """Names a template's link: which interpreter runs which checkout of the code.

    Whether the template's code is current is the template's to know (it watches it,
    shim/codewatch.py); this only keeps two installs sharing a template directory apart.
    """
    return str(sha256(f"{executable}\0{root}".encode()).hexdigest()[:24])


def link_path(directory: str, key: str) -> str:
    return f"{directory}/{key}.link"


def package_root() -> str:
    """The directory holding the `shim` and `protocol` packages (without importing os)."""
    here = __file__ if __file__.startswith("/") else f"{posix.getcwd()}/{__file__}"
    return here.rsplit("/", 3)[0]


def handoff(
    argv: list[bytes],
    directory: str,
    key: str,
    stdio: tuple[int, int, int] = (0, 1, 2),
    timeout: float = REPLY_TIMEOUT,
) -> int | None:
    """Exit status of the start the template ran, or None: nothing was done, run it here.

    Falls back only where nothing can still happen: the template could not be
    reached, declined, or is gone with nobody holding the request. A start run here
    beside a spare that took the request would find the spare's socket bound and
    take it for a live shim.
    """
    if not private_dir(directory):
        return None
    link = link_path(directory, key)
    conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        conn.settimeout(timeout)
        try:
            conn.connect(link)
        except OSError:
            return None  # no template (yet), or it quit: the ordinary path spawns one
        pid, uid, _ = peer(conn)
        if not trusted(uid):
            return None
        umask = posix.umask(0o022)
        posix.umask(umask)
        request = Request(
            argv,
            [k + b"=" + v for k, v in posix.environ.items()],
            posix.getcwd().encode(errors="surrogateescape"),
            umask,
            posix.getppid(),
        )
        try:
            send_fds(conn, request.encode(), stdio)
        except OSError:
            return None
        try:
            reply = conn.recv(64)
        except TimeoutError:
            # Retired (killed), the template can hand nothing over any more; then the
            # connection ends (nobody has the request) or the spare that has it answers.
            late = late_reply(conn, link, pid, 64)
            reply = TAKEN if late is None else late
        except OSError:
            reply = b""  # reset: whoever had the request is gone, with its listener
        if reply == TAKEN:
            conn.settimeout(SPARE_TIMEOUT)
            try:
                reply = conn.recv(64)
            except TimeoutError:
                fail_to(
                    stdio[2], f"no answer from the shim template's spare in {SPARE_TIMEOUT:.0f}s"
                )
                return 1
            except OSError:
                reply = b""
        if reply not in (b"0", b"1"):
            # FALLBACK, or an end with nobody holding the request (a spare that
            # died took its listener along: start finds that socket dead), or
            # something that does not speak this protocol.
            return None
        if reply == b"0":
            try:
                conn.send(GO)
            except OSError:
                return 1  # the daemon-to-be is gone: containerd sees a failed start
        return int(reply)
    finally:
        conn.close()


def fail_to(fd: int, message: str) -> None:
    """The Go shim's error convention (shim.boot.cli.fail) on ``fd``: `<runtime>: <message>`."""
    from shim.sys.fdio import write_all

    try:  # noqa: SIM105 (contextlib costs ~1-4 ms to import)
        write_all(fd, f"{RUNTIME_NAME}: {message}".encode())
    except OSError:
        pass


def run() -> None:
    """The launcher's first step: a `start` the template ran ends here, with its status;
    anything else returns, and the launcher runs shim.boot.cli."""
    argv = sys.argv
    env = posix.environ
    if (
        argv[-1:] == ["start"]
        and env.get(ENABLE_ENV.encode(), b"1") != b"0"
        and not env.get(SCHED_CORE_ENV.encode())
    ):
        directory = env.get(DIR_ENV.encode(), b"").decode(errors="surrogateescape")
        directory = directory or DEFAULT_DIR
        key = install_key(sys.executable, package_root())
        code = handoff([a.encode(errors="surrogateescape") for a in argv], directory, key)
        if code is not None:
            posix._exit(code)
