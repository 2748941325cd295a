"""The `start` action: bind the group's socket, spawn the daemon, print the address.

Runs once per container under containerd's clock, so it sticks to builtins
(no protobuf, no asyncio, no subprocess): see shim-cli.md "What the reference
start does". Even `socket`, `signal` and `contextlib` cost ~10 ms together at
start-up (enum, collections, functools): `_socket` and plain try/except instead.
"""

from __future__ import annotations

import _socket
import errno
import fcntl
import os
import stat
import sys

from protocol import wire
from shim.boot import bootstrap, minijson
from shim.boot.rendezvous import sha256

TYPE_CHECKING = False  # typing costs ~3 ms at start-up; mypy honours this name


if TYPE_CHECKING:
    from collections.abc import Callable

    from shim.boot.flags import Options
    from shim.boot.templateclient import Forked

SOCKET_DIR = "/run/containerd/s"
GROUP_ANNOTATION = "io.containerd.pyshim.v1.group"
CRI_SANDBOX_ANNOTATION = "io.kubernetes.cri.sandbox-id"
# Option types that carry a shim cgroup, and its field number in each: the runc
# shim's own, and the legacy linux runtime's, which containerd's Go client sends to
# any runtime not named io.containerd.runc.* (WithShimCgroup).
SHIM_CGROUP_FIELDS = {"containerd.runc.v1.Options": 3, "containerd.linux.runc.CreateOptions": 9}
# The Go shim's limit: sun_path holds 108 bytes including the NUL.
MAX_SOCKET_PATH = 106
DIAL_TIMEOUT = 0.1
MAX_STDIN = 10 << 20
DAEMON_FD = 3
SIGKILL = 9


class StartError(Exception):
    pass


def grouping_key(config_path: str, container_id: str) -> str:
    with open(config_path, "rb") as f:
        spec = minijson.load(f)
    annotations = spec.get("annotations") or {}
    for key in (GROUP_ANNOTATION, CRI_SANDBOX_ANNOTATION):
        value = annotations.get(key)
        if isinstance(value, str) and value:
            return value
    return container_id


def socket_address(
    grpc_address: str, namespace: str, key: str, socket_dir: str = SOCKET_DIR
) -> str:
    """unix://<socket_dir>/sha256(path.Join(address, namespace, key))."""
    joined = _go_path_join(grpc_address, namespace, key)
    return f"unix://{socket_dir}/{sha256(joined.encode()).hexdigest()}"


def _go_path_join(*parts: str) -> str:
    """Go's path.Join: join the non-empty parts with "/" and Clean the result."""
    joined = "/".join(p for p in parts if p)
    if not joined:
        return ""
    rooted = joined.startswith("/")
    out: list[str] = []
    for comp in joined.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if out and out[-1] != "..":
                out.pop()
            elif not rooted:
                out.append("..")
            continue
        out.append(comp)
    cleaned = "/".join(out)
    if rooted:
        return "/" + cleaned
    return cleaned or "."


class StdinOptions:
    """What `start` needs from its stdin: runtime options (legacy Any or 2.3+ bootstrap)."""

    def __init__(
        self, shim_cgroup: str = "", socket_dir: str | None = None, bootstrap: bool = False
    ) -> None:
        self.shim_cgroup = shim_cgroup
        self.socket_dir = socket_dir
        # containerd sent BootstrapParams (2.3+), so it reads a BootstrapResult back.
        self.bootstrap = bootstrap


def _options_from_any(data: bytes) -> str:
    type_url, value = wire.decode_any(data)
    name = type_url.rsplit("/", 1)[-1]
    number = SHIM_CGROUP_FIELDS.get(name)
    if number:
        return wire.string_field(value, number)
    if name == "runtimeoptions.v1.Options":  # TOML (shim/task/runtimeconfig.py)
        from shim.task import runtimeconfig

        path, body = wire.string_field(value, 2), wire.bytes_field(value, 3)
        cgroup = runtimeconfig.read_config(path, body).get("shimcgroup", "")
        if not isinstance(cgroup, str):
            raise ValueError(f"ShimCgroup must be a string, not {cgroup!r}")
        return cgroup
    return ""


def parse_stdin(data: bytes, *, container_id: str, namespace: str) -> StdinOptions:
    if not data:
        return StdinOptions()
    try:
        fields = list(wire.iter_fields(data))
        strings = {
            n: v.decode() for n, w, v in fields if w == wire.LEN and isinstance(v, bytes) and n < 8
        }
        is_bootstrap = strings.get(1) == container_id and strings.get(2) == namespace
    except (ValueError, UnicodeDecodeError):
        is_bootstrap = False
    if is_bootstrap:
        cgroup = ""
        socket_dir: str | None = None
        for n, w, v in fields:
            if n == 8 and w == wire.LEN and isinstance(v, bytes):
                ext = dict((num, val) for num, _, val in wire.iter_fields(v))
                opts = ext.get(1)
                if isinstance(opts, bytes) and not cgroup:
                    try:
                        cgroup = _options_from_any(opts)
                    except ValueError as exc:
                        raise StartError(f"failed to decode runtime options: {exc}") from None
            elif n == 9 and w == wire.LEN and isinstance(v, bytes):
                socket_dir = v.decode()
        return StdinOptions(cgroup, socket_dir or None, bootstrap=True)
    try:
        return StdinOptions(_options_from_any(data))
    except (ValueError, UnicodeDecodeError) as exc:
        raise StartError(f"failed to decode runtime options: {exc}") from None


def _connect_errno(path: str) -> int:
    """0 when something listens at ``path``, else the connect's errno (a stopped shim
    still counts as listening: the kernel queues the connection)."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        s.settimeout(DIAL_TIMEOUT)
        s.connect(path)
    except TimeoutError:
        return errno.ETIMEDOUT
    except OSError as exc:
        return exc.errno or errno.EIO
    finally:
        s.close()
    return 0


def _dial(path: str) -> bool:
    return _connect_errno(path) == 0


def remove_if_dead(path: str, ino: int | None = None) -> bool:
    """Unlink the socket file at ``path`` when nothing listens on it (and, given
    ``ino``, it is still that file); whether it did. Under the socket directory's
    lock, so a `start` binding there is never caught between its bind and listen.
    An unlink that fails for another reason than a missing file raises."""
    try:
        lock_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            st = os.lstat(path)
        except OSError:
            return False
        if not stat.S_ISSOCK(st.st_mode) or (ino is not None and st.st_ino != ino):
            return False
        if _connect_errno(path) != errno.ECONNREFUSED:
            return False  # alive, missing, or not ours to judge
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True
    finally:
        os.close(lock_fd)


def bind_or_find(path: str) -> _socket.socket | None:
    """Listening socket at path, or None when a live shim already answers there.

    The caller holds the directory lock, so a concurrent start cannot slip
    between our failed bind and the stale-socket unlink.
    """
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            if _dial(path):
                sock.close()
                return None
            os.unlink(path)
            sock.bind(path)
        sock.listen(_socket.SOMAXCONN)
        os.chmod(path, 0o600)
    except BaseException:
        sock.close()
        raise
    return sock


def write_address(directory: str, address: str) -> None:
    """<dir>/address via .address (O_EXCL|O_SYNC) + rename, as the Go shim does."""
    tmp = os.path.join(directory, ".address")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_SYNC | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o666)
    except FileExistsError:
        # Left by a start that died mid-write; containerd never runs two
        # starts for one bundle at once.
        os.unlink(tmp)
        fd = os.open(tmp, flags, 0o666)
    try:
        os.write(fd, address.encode())
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(directory, "address"))


def daemon_argv(opts: Options, prog: str | None = None) -> list[str]:
    """The daemon's command line; ``prog`` is the binary `start` ran as (our argv[0])."""
    if prog is None:
        prog = sys.argv[0] if sys.argv else ""
    if os.path.isabs(prog) and not prog.endswith(".py") and os.access(prog, os.X_OK):
        head = [prog]
    else:
        head = [sys.executable, "-m", "shim"]
    argv = [*head, "-namespace", opts.namespace, "-id", opts.id, "-address", opts.address]
    if opts.publish_binary:
        argv += ["-publish-binary", opts.publish_binary]
    if opts.debug:
        argv.append("-debug")
    return argv


def spawn_daemon(argv: list[str], listener: _socket.socket) -> int:
    """The daemon: own process group, stdio on /dev/null, listener as fd 3, our cwd."""
    fd = listener.fileno()
    # dup2 onto itself keeps FD_CLOEXEC, so make the source inheritable in case it is 3.
    os.set_inheritable(fd, True)
    actions = [
        (os.POSIX_SPAWN_DUP2, fd, DAEMON_FD),
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
    ]
    try:
        return os.posix_spawn(argv[0], argv, os.environ, file_actions=actions, setpgroup=0)
    finally:
        os.set_inheritable(fd, False)


def fork_from_template(
    argv: list[str], listener: _socket.socket, meanwhile: Callable[[], object] | None = None
) -> Forked | None:
    """The daemon forked by the template (shim/template.py), or None to re-execute.

    ``meanwhile`` runs while the template hands the request over, if it was sent.
    SCHED_CORE wants a cookie for the daemon's process group, made before it
    exists; that stays with the re-exec path.
    """
    if os.environ.get("SCHED_CORE"):
        return None
    from shim.boot import templateclient

    if not templateclient.enabled():
        return None
    return templateclient.fork_daemon(argv, listener, meanwhile=meanwhile)


def sched_core_create() -> None:
    """A core-scheduling cookie for our process group, inherited by the daemon."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_sched_core, create, pidtype_pgid = 62, 1, 2
    if libc.prctl(pr_sched_core, create, 0, pidtype_pgid, 0) != 0:
        err = ctypes.get_errno()
        raise StartError(f"enable sched core support: {os.strerror(err)}")


def move_to_cgroup(pid: int, cgroup: str) -> None:
    rel = cgroup.lstrip("/")
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        targets = [os.path.join("/sys/fs/cgroup", rel, "cgroup.procs")]
    else:
        targets = []
        for hierarchy in sorted(os.listdir("/sys/fs/cgroup")):
            base = os.path.join("/sys/fs/cgroup", hierarchy)
            # cpu -> cpu,cpuacct style links name the same hierarchy twice.
            if os.path.islink(base) or not os.path.isdir(os.path.join(base, rel)):
                continue
            targets.append(os.path.join(base, rel, "cgroup.procs"))
        if not targets:
            raise StartError(f"failed to load cgroup {cgroup}: not found")
    for target in targets:
        try:
            with open(target, "w") as f:
                f.write(str(pid))
        except OSError as exc:
            raise StartError(f"failed to join cgroup {cgroup}: {exc}") from None


def raise_oom_score(pid: int, parent: int | None = None) -> None:
    """containerd's oom_score_adj + 1 (max 1000), but never lower the daemon's value.

    ``parent`` is containerd's pid (our parent's, by default). Lowering needs
    CAP_SYS_RESOURCE, which root in a container may lack.
    """
    try:
        with open(f"/proc/{os.getppid() if parent is None else parent}/oom_score_adj") as f:
            target = min(int(f.read()) + 1, 1000)
        path = f"/proc/{pid}/oom_score_adj"
        with open(path) as f:
            current = int(f.read())
        if target > current:
            with open(path, "w") as f:
                f.write(str(target))
    except PermissionError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM):
            raise


def _read_stdin() -> bytes:
    try:
        return sys.stdin.buffer.read(MAX_STDIN)
    except (OSError, AttributeError, ValueError):
        return b""


def _kill(pid: int) -> None:
    try:
        os.kill(pid, SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


class Bound:
    """What `start` settled before any daemon exists: the address, and the listener
    bound for it (None: a live shim of the same group serves that address already)."""

    def __init__(
        self, address: str, listener: _socket.socket | None, options: StdinOptions
    ) -> None:
        self.address = address
        self.path = address[len("unix://") :]
        self.listener = listener
        self.options = options

    def answer(self) -> bytes:
        """What `start` prints on stdout for this address (shim/bootstrap.py)."""
        return bootstrap.answer(self.address, bootstrap=self.options.bootstrap)

    def abandon(self) -> None:
        """Close and remove the socket: no daemon will serve it."""
        if self.listener is None:
            return
        self.listener.close()
        try:  # noqa: SIM105 (contextlib: see the module docstring)
            os.unlink(self.path)
        except OSError:
            pass


def bind_for(opts: Options, stdin_data: bytes, bundle: str) -> Bound:
    if not opts.id:
        raise StartError("shim id cannot be empty")
    stdin = parse_stdin(stdin_data, container_id=opts.id, namespace=opts.namespace)
    key = grouping_key(os.path.join(bundle, "config.json"), opts.id)
    address = socket_address(opts.address, opts.namespace, key, stdin.socket_dir or SOCKET_DIR)
    path = address[len("unix://") :]
    if len(path) > MAX_SOCKET_PATH:
        raise StartError(f"{path!r}: unix socket path too long (> {MAX_SOCKET_PATH})")
    socket_dir = os.path.dirname(path)
    os.makedirs(socket_dir, mode=0o600, exist_ok=True)

    lock_fd = os.open(socket_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        listener = bind_or_find(path)
    finally:
        os.close(lock_fd)
    return Bound(address, listener, stdin)


def start_here(opts: Options, stdin_data: bytes, bundle: str, parent: int) -> Bound:
    """`start` in the process that becomes the daemon (a template's spare, see
    shim/quickstart.py): bind, write the address, and, when we are to serve it, join
    the shim cgroup and raise our oom score. ``parent`` is containerd's pid."""
    bound = bind_for(opts, stdin_data, bundle)
    try:
        write_address(bundle, bound.address)
        if bound.listener is not None:
            if bound.options.shim_cgroup:
                move_to_cgroup(os.getpid(), bound.options.shim_cgroup)
            raise_oom_score(os.getpid(), parent)
    except BaseException:
        bound.abandon()
        raise
    return bound


def run_start(opts: Options) -> int:
    bundle = os.getcwd()
    bound = bind_for(opts, _read_stdin(), bundle)
    address, listener, stdin = bound.address, bound.listener, bound.options
    if listener is None:
        write_address(bundle, address)
        _print_answer(bound)
        return 0

    pid = 0
    forked: Forked | None = None
    written: list[bool] = []

    def write() -> None:
        # O_SYNC: ~0.5-1.5 ms on ext4, spent while the template hands over.
        write_address(bundle, address)
        written.append(True)

    try:
        argv = daemon_argv(opts)
        forked = fork_from_template(argv, listener, write)
        if not written:
            write()  # before any daemon exists: a re-executed one reads it at start-up
        if forked is not None:
            pid = forked.pid
        else:
            if os.environ.get("SCHED_CORE"):
                sched_core_create()
            pid = spawn_daemon(argv, listener)
        if stdin.shim_cgroup:
            move_to_cgroup(pid, stdin.shim_cgroup)
        raise_oom_score(pid)
        if forked is not None:
            # Only now may it serve: cgroup and oom score are in place, and no
            # fallback daemon can exist beside it.
            forked.go()
    except BaseException:
        if forked is not None:
            forked.abort()  # it exits on its own, having served nothing
        elif pid:
            _kill(pid)
        bound.abandon()
        raise
    finally:
        listener.close()
    _print_answer(bound)
    return 0


def _print_answer(bound: Bound) -> None:
    sys.stdout.flush()
    sys.stdout.buffer.write(bound.answer())
    sys.stdout.buffer.flush()
