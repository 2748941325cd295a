"""The long-lived shim process (shim-cli.md "The daemon").

`start` re-executes the binary with no action, cwd = bundle, the listening
socket as fd 3 and stdio on /dev/null. Everything cwd-relative (the `log` fifo,
the `address` file) is read here at start-up only: in a grouped shim the first
container's bundle, our cwd, can be deleted while we keep serving others.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from protocol.ttrpc.server import Server, root_or_same_user_peer_check
from shim import log as shimlog
from shim.events import Publisher
from shim.reaper import Reaper
from shim.sys import syscalls

if TYPE_CHECKING:
    from shim.boot.flags import Options

__all__ = ["DaemonConfig", "Service", "ServiceFactory", "run_daemon", "serve"]

_log = logging.getLogger("shim.daemon")

LISTEN_FD = 3
SERVER_SHUTDOWN_TIMEOUT = 2.0
PUBLISHER_FLUSH_TIMEOUT = 5.0


class Service(Protocol):
    def register(self, server: Server) -> None: ...

    async def recover(self, bundle: str) -> bool: ...


ServiceFactory = Callable[[str, Publisher, Reaper, Callable[[], None]], Service]


def _task_service(
    namespace: str, publisher: Publisher, reaper: Reaper, request_shutdown: Callable[[], None]
) -> Service:
    from shim.task.service import TaskService

    return TaskService(
        namespace=namespace, publisher=publisher, reaper=reaper, request_shutdown=request_shutdown
    )


class DaemonConfig:
    def __init__(
        self,
        *,
        namespace: str,
        container_id: str,
        grpc_address: str,
        publish_binary: str,
        ttrpc_address: str | None,
        debug: bool = False,
        socket_path: str | None = None,
        bundle: str | None = None,
    ) -> None:
        self.namespace = namespace
        self.container_id = container_id
        self.grpc_address = grpc_address
        self.publish_binary = publish_binary
        self.ttrpc_address = ttrpc_address
        self.debug = debug
        # The filesystem socket to remove at shutdown (from `address` or -socket).
        self.socket_path = socket_path
        # The first container's bundle (our cwd at start-up), for recovery only.
        self.bundle = bundle


# Like the Go shim (same uid and gid as us), and root is always let in.
peer_check = root_or_same_user_peer_check


def _open_log_fifo() -> None:
    """fd 2 = <cwd>/log (containerd holds the read end); keep /dev/null when absent."""
    try:
        fd = os.open("log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    if fd != 2:
        os.dup2(fd, 2)
        os.close(fd)
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), line_buffering=True, errors="replace"
    )


def warn_unusable_template() -> None:
    """Say why the template directory is not used, where it exists but is not ours
    alone (shim.boot.rendezvous.private_dir): every start then silently pays a whole
    interpreter start-up and every shim its own copy of the code."""
    from shim.boot import rendezvous

    if os.environ.get(rendezvous.ENABLE_ENV, "1") == "0":
        return
    directory = os.environ.get(rendezvous.DIR_ENV) or rendezvous.DEFAULT_DIR
    try:
        st = os.lstat(directory)
    except OSError:
        return  # the first start makes it
    if not rendezvous.private_dir(directory):
        _log.warning(
            "shim template directory %s is not used: it must be a directory owned by uid %d "
            "with no access for group or others (it has mode %o, owner uid %d)",
            directory,
            os.geteuid(),
            stat.S_IMODE(st.st_mode),
            st.st_uid,
        )


def _read_socket_path() -> str | None:
    try:
        with open("address") as f:
            address = f.read().strip()
    except OSError:
        return None
    if address.startswith("unix://"):
        return address[len("unix://") :]
    return None


def _listener_from_fd(fd: int) -> socket.socket:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise RuntimeError(f"fd {fd} is not open: run through `start` or pass -socket") from exc
    if not stat.S_ISSOCK(mode):
        raise RuntimeError(f"fd {fd} is not a socket: run through `start` or pass -socket")
    sock = socket.socket(fileno=fd)
    # runc and every other child must not inherit the listener (the Go shim leaks it).
    os.set_inheritable(fd, False)
    return sock


def _dump_stacks() -> None:
    import faulthandler
    import tempfile

    buf = io.StringIO()
    for task in asyncio.all_tasks():
        buf.write(f"task {task.get_name()}:\n")
        task.print_stack(file=buf)
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        buf.write(f.read())
    _log.info("=== BEGIN stack dump ===\n%s=== END stack dump ===", buf.getvalue())


def _unlink_socket(path: str | None, inode: int | None) -> None:
    if not path:
        return
    try:
        # A new `start` may have replaced a socket we no longer serve; leave that one.
        if inode is not None and os.stat(path).st_ino != inode:
            return
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            _log.warning("failed to remove socket %s: %s", path, exc)


def _assemble(
    cfg: DaemonConfig,
    reaper: Reaper,
    service_factory: ServiceFactory,
    request_shutdown: Callable[[], None],
) -> tuple[Publisher, Server, Service]:
    """The publisher, the server and the task service registered on it: what serve()
    runs, and what rehearse() builds once and drops."""
    publisher = Publisher(
        namespace=cfg.namespace,
        ttrpc_address=cfg.ttrpc_address,
        publish_binary=cfg.publish_binary,
        containerd_address=cfg.grpc_address,
        reaper=reaper,
    )
    server = Server(peer_check=peer_check)
    service = service_factory(cfg.namespace, publisher, reaper, request_shutdown)
    service.register(server)
    return publisher, server, service


async def serve(
    cfg: DaemonConfig,
    listener: socket.socket,
    *,
    service_factory: ServiceFactory = _task_service,
    early_signals: list[int] | None = None,
) -> None:
    """Serve until Shutdown or SIGTERM/SIGINT, then stop in the documented order."""
    loop = asyncio.get_running_loop()
    inode = None
    if cfg.socket_path:
        with contextlib.suppress(OSError):
            inode = os.stat(cfg.socket_path).st_ino

    for handler in logging.getLogger().handlers:
        if isinstance(handler, shimlog.FdHandler):
            # Lines that would block the fifo wait for writability on the loop.
            handler.attach_loop(loop)
    reaper = Reaper()
    reaper.install(loop)
    stop = asyncio.Event()

    def request_shutdown() -> None:
        # As the Go shim: the socket file is gone before Shutdown is answered, so
        # whoever reads the answer finds nothing left to dial or to clean up, whatever
        # becomes of this process afterwards.
        _unlink_socket(cfg.socket_path, inode)
        stop.set()

    publisher, server, service = _assemble(cfg, reaper, service_factory, request_shutdown)
    if cfg.bundle:
        # A shim restarted on a bundle an earlier shim served answers State/Wait
        # from that shim's persisted records instead of forgetting the container.
        try:
            if await service.recover(cfg.bundle):
                _log.info("recovered container from %s", cfg.bundle)
        except Exception:
            _log.exception("failed to recover container from %s", cfg.bundle)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _dump_stacks)
    if early_signals:
        _log.info("signal %d before the loop started", early_signals[0])
        stop.set()
    try:
        await server.serve_socket(listener)
        _log.info("starting signal loop")
        await stop.wait()
        _log.info("shutting down")
        _unlink_socket(cfg.socket_path, inode)  # after a signal: not done yet
        await server.shutdown(SERVER_SHUTDOWN_TIMEOUT)
        await publisher.close(PUBLISHER_FLUSH_TIMEOUT)
    finally:
        server.close()
        for sig in handled:
            loop.remove_signal_handler(sig)
        reaper.uninstall()


def rehearse() -> None:
    """Build what serve() builds, against nothing, and drop it.

    Run by a pre-forked spare daemon while it waits (shim/boot/template.py): the first
    run of this code takes the copy-on-write faults and warms the interpreter's
    caches, which the daemon the spare becomes then finds done. It publishes, spawns,
    listens and logs nothing, and leaves no task, timer or handler behind; the one
    thing that stays is libuv's process-wide signal pipe, which a daemon's own first
    loop opens anyway.
    """
    import uvloop

    from shim.task.service import TaskService

    cfg = DaemonConfig(
        namespace="",
        container_id="",
        grpc_address="",
        publish_binary="",
        ttrpc_address="/dev/null",  # never dialled: nothing is published
    )

    async def build() -> None:
        _, server, service = _assemble(cfg, Reaper(), _task_service, lambda: None)
        if isinstance(service, TaskService):  # what _task_service makes
            service.close()
        server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(build())


def run_daemon(opts: Options, early_signals: list[int] | None = None) -> int:
    cfg = DaemonConfig(
        namespace=opts.namespace,
        container_id=opts.id,
        grpc_address=opts.address or os.environ.get("GRPC_ADDRESS", ""),
        publish_binary=opts.publish_binary,
        ttrpc_address=os.environ.get("TTRPC_ADDRESS") or None,
        debug=opts.debug,
        bundle=os.getcwd(),
    )
    _open_log_fifo()
    shimlog.setup(debug=cfg.debug, namespace=cfg.namespace)
    warn_unusable_template()
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    syscalls.set_child_subreaper(True)
    if opts.socket:
        path = opts.socket.removeprefix("unix://")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(path)
        listener.listen(socket.SOMAXCONN)
        os.chmod(path, 0o600)
        cfg.socket_path = path
    else:
        cfg.socket_path = _read_socket_path()
        listener = _listener_from_fd(LISTEN_FD)
    if opts.debug_socket:
        _log.debug("ignoring -debug-socket %s (no debug endpoint)", opts.debug_socket)

    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(cfg, listener, early_signals=early_signals))
    return 0
