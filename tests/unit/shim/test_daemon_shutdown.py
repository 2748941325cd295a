"""The daemon's socket file across a shutdown (shim/daemon.py serve)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from protocol.ttrpc.server import Server
from shim.daemon import DaemonConfig, serve
from shim.events import Publisher
from shim.reaper import Reaper


class _Service:
    def __init__(self, request_shutdown: Callable[[], None]) -> None:
        self.request_shutdown = request_shutdown

    def register(self, server: Server) -> None:
        pass

    async def recover(self, bundle: str) -> bool:
        return False


def _config(path: Path) -> DaemonConfig:
    return DaemonConfig(
        namespace="ns",
        container_id="c1",
        grpc_address="",
        publish_binary="",
        ttrpc_address="/dev/null",
        socket_path=str(path),
    )


def _listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


async def _serving(path: Path) -> tuple[asyncio.Task[None], list[_Service]]:
    made: list[_Service] = []

    def factory(
        ns: str, publisher: Publisher, reaper: Reaper, request_shutdown: Callable[[], None]
    ) -> _Service:
        made.append(_Service(request_shutdown))
        return made[-1]

    task = asyncio.create_task(serve(_config(path), _listener(path), service_factory=factory))
    while not made:
        await asyncio.sleep(0)
    return task, made


async def test_socket_file_is_gone_when_shutdown_is_requested(tmp_path: Path) -> None:
    # As the Go shim: gone before Shutdown is answered (the answer is written after
    # the handler returns), whatever becomes of the process afterwards.
    path = tmp_path / "s.sock"
    task, (service,) = await _serving(path)
    service.request_shutdown()
    assert not path.exists()
    await asyncio.wait_for(task, 10)


async def test_socket_file_is_removed_on_sigterm_but_not_a_replacement(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    task, _ = await _serving(path)
    path.unlink()
    replacement = _listener(path)  # a later `start` bound the same name
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 10)
        assert path.exists()
    finally:
        replacement.close()
