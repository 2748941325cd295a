"""pyshimd: serves the manager API, receives shim events, and reconnects to shims on start.

Also answers ``pyshimd --address SOCK publish --topic T --namespace N`` (the shim's
publish-binary fallback, containerd's argv shape): the event Any on stdin is forwarded to
this daemon's events socket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import grp
import logging
import os
import pwd
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import any_pb2, empty_pb2

from manager import network
from manager.images import ImageStore
from manager.launcher import ShimLauncher, ShimLaunchError, find_shim_binary
from manager.logindex import LogIndexer
from manager.paths import Paths
from manager.pulls import Puller
from manager.records import RecordStore
from manager.service import EVENTS_SERVICE, EventsService, ManagerService
from manager.supervisor import Supervisor
from protocol.proto import timeutil
from protocol.proto.events import forward_pb2
from protocol.ttrpc.client import Client
from protocol.ttrpc.server import PeerCheck, Server, root_or_same_user_peer_check

log = logging.getLogger("pyshimd")
SHUTDOWN_TIMEOUT = 5.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pyshimd",
        description="pyshim manager daemon: runs containers through containerd-shim-pyshim-v1",
    )
    p.add_argument("--run-dir", help="sockets, bundles, fifos (env PYSHIM_RUN_DIR, /run/pyshim)")
    p.add_argument("--state-dir", help="records, logs, images (env PYSHIM_STATE_DIR)")
    p.add_argument("--shim-binary", help="path of containerd-shim-pyshim-v1 (default: PATH)")
    p.add_argument("--group", help="group allowed to use the API socket (default: root only)")
    p.add_argument(
        "--runc-binary", default="", help="the shims' runc (name or path; default: runc)"
    )
    p.add_argument(
        "--bridge",
        default=network.DEFAULT_BRIDGE,
        help=f"bridge of the default network (default {network.DEFAULT_BRIDGE})",
    )
    p.add_argument(
        "--subnet",
        default=network.DEFAULT_SUBNET,
        help=f"its addresses, host-local IPAM (default {network.DEFAULT_SUBNET})",
    )
    p.add_argument(
        "--cni-path",
        default=network.DEFAULT_CNI_PATH,
        help=f"CNI plugin binaries (default {network.DEFAULT_CNI_PATH})",
    )
    p.add_argument(
        "--certs-dir",
        default="/etc/pyshim/certs.d",
        help="extra registry CAs as DIR/HOST[:PORT]/*.crt (default /etc/pyshim/certs.d)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def _bind_socket(path: Path, mode: int, gid: int | None) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # Nobody else may connect in the window between bind and chmod.
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(path, 0, gid)
    os.chmod(path, mode)
    sock.listen(socket.SOMAXCONN)
    return sock


def _lock(paths: Paths) -> int:
    fd = os.open(paths.run_dir / "pyshimd.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"pyshimd: another pyshimd already serves {paths.run_dir}") from None
    return fd


def api_peer_check(group_gid: int | None) -> PeerCheck:
    """Who may use the API: root, our own user, and members of the configured group.

    The socket's mode already says so; checking SO_PEERCRED too means a socket file
    opened up by mistake (or a descriptor passed on) still admits no one else.
    """

    def check(pid: int, uid: int, gid: int) -> bool:
        if root_or_same_user_peer_check(pid, uid, gid):
            return True
        if group_gid is None:
            return False
        if gid == group_gid:
            return True
        # SO_PEERCRED carries only the primary gid: look the user up in the group.
        try:
            return pwd.getpwuid(uid).pw_name in grp.getgrgid(group_gid).gr_mem
        except KeyError:
            return False

    return check


async def serve(paths: Paths, args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gid = grp.getgrnam(args.group).gr_gid if args.group else None

    store = RecordStore(paths)
    images = ImageStore(paths.images_dir)
    launcher = ShimLauncher(
        binary=find_shim_binary(args.shim_binary),
        paths=paths,
        publish_binary=str(Path(sys.argv[0]).absolute()),
    )
    bridge = network.BridgeNetwork(
        bridge=args.bridge,
        subnet=args.subnet,
        cni_path=args.cni_path,
        ipam_dir=str(paths.cni_ipam_dir),
    )
    sup = Supervisor(paths, store, launcher, images, bridge, runc_binary=args.runc_binary)
    sup.log_index = LogIndexer()

    # Events first: shims that queued exits while we were down deliver them as we recover.
    events = Server(peer_check=root_or_same_user_peer_check)
    EventsService(sup).register(events)
    await events.serve_socket(_bind_socket(paths.events_socket, 0o600, None))
    await sup.recover()

    api = Server(peer_check=api_peer_check(gid))
    puller = Puller(images, paths.state_dir, Path(args.certs_dir))
    ManagerService(sup, images, puller).register(api)
    await api.serve_socket(_bind_socket(paths.socket, 0o660 if gid is not None else 0o600, gid))
    paths.pid_file.write_text(f"{os.getpid()}\n")
    log.info("pyshimd %d serving %s (state %s)", os.getpid(), paths.socket, paths.state_dir)

    await stop.wait()
    log.info("pyshimd stopping; containers keep running")
    await api.shutdown(SHUTDOWN_TIMEOUT)
    await sup.close()
    await events.shutdown(1.0)
    for path in (paths.socket, paths.events_socket, paths.pid_file):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def publish(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="pyshimd publish")
    p.add_argument("--address", required=True, help="pyshimd's API socket (shim -address)")
    p.add_argument("--topic", required=True)
    p.add_argument("--namespace", required=True)
    opts = p.parse_args(argv)
    event = any_pb2.Any.FromString(sys.stdin.buffer.read())
    envelope = forward_pb2.Envelope(namespace=opts.namespace, topic=opts.topic, event=event)
    envelope.timestamp.CopyFrom(timeutil.timestamp_now())
    events_path = str(Path(opts.address).parent / "events.sock")
    async with await Client.connect(events_path, timeout=5.0) as client:
        await client.call(
            EVENTS_SERVICE,
            "Forward",
            forward_pb2.ForwardRequest(envelope=envelope),
            empty_pb2.Empty,
            timeout=5.0,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "publish" in argv:
        i = argv.index("publish")
        return asyncio.run(publish(argv[:i] + argv[i + 1 :]))
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    paths = Paths.resolve(args.run_dir, args.state_dir)
    paths.run_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
    paths.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_fd = _lock(paths)
    try:
        asyncio.run(serve(paths, args))
    except (ShimLaunchError, network.NetworkError) as exc:
        sys.stderr.write(f"pyshimd: {exc}\n")
        return 1
    finally:
        os.close(lock_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
