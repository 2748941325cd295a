"""pyshimd's own Run path, in-process, with a fake shim: the manager's work and its
record saves only (no shim, runc or CLI), for `run --rm --network none`.

    .venv/bin/python -m bench.manager_run_path --runs 60 [--no-fsync]

--no-fsync makes os.fsync a no-op: the floor the saves' syncing is measured against.
Everything lives in a temp dir under /var/tmp (the real disk, as /var/lib/pyshim).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from manager.images import ImageStore
from manager.launcher import ShimLauncher
from manager.paths import Paths
from manager.records import RecordStore
from manager.shimclient import ShimClient
from manager.supervisor import Supervisor
from protocol.proto.manager.v1 import manager_pb2
from protocol.proto.task.v2 import shim_pb2


class FakeShim:
    """What Run and the removal ask a shim; the init exits when told."""

    def __init__(self) -> None:
        self.exit = asyncio.Event()
        self._closed = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def connect(self, cid: str) -> shim_pb2.ConnectResponse:
        return shim_pb2.ConnectResponse(shim_pid=1)

    async def create(self, req: shim_pb2.CreateTaskRequest) -> shim_pb2.CreateTaskResponse:
        return shim_pb2.CreateTaskResponse(pid=2)

    async def start(self, cid: str, *_: object, **__: object) -> shim_pb2.StartResponse:
        return shim_pb2.StartResponse(pid=2)

    async def wait(self, cid: str, *_: object) -> shim_pb2.WaitResponse:
        await self.exit.wait()
        return shim_pb2.WaitResponse(exit_status=0)

    async def delete(self, cid: str, *_: object) -> shim_pb2.DeleteResponse:
        return shim_pb2.DeleteResponse()

    async def shutdown(self, cid: str) -> None:
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def close(self) -> None:
        self._closed.set()


async def measure(runs: int) -> tuple[list[float], list[float]]:
    root = Path(tempfile.mkdtemp(prefix="pyshim-runpath-", dir="/var/tmp"))
    try:
        paths = Paths(root / "run", root / "state")
        launcher = ShimLauncher(binary="/nonexistent", paths=paths, publish_binary="/nonexistent")
        sup = Supervisor(paths, RecordStore(paths), launcher, ImageStore(paths.images_dir))
        shim = FakeShim()

        async def start(self: ShimLauncher, cid: str, bundle: Path) -> str:
            return "unix:///nonexistent"

        async def dial(address: str, fresh: bool = False) -> FakeShim:
            return shim

        ShimLauncher.start = start  # type: ignore[method-assign,assignment]
        ShimClient.dial = dial  # type: ignore[assignment]
        answered: list[float] = []
        removed: list[float] = []
        for _ in range(runs):
            shim = FakeShim()
            t0 = time.perf_counter()
            cfg = manager_pb2.ContainerConfig(args=["true"], network="none", auto_remove=True)
            c = await sup.run(cfg)
            t1 = time.perf_counter()
            shim.exit.set()
            await c.exited.wait()
            await sup.remove(c.id, force=True)
            t2 = time.perf_counter()
            answered.append((t1 - t0) * 1e3)
            removed.append((t2 - t0) * 1e3)
            await asyncio.sleep(0.05)  # one run after another, as the CLI makes them
        return answered, removed
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _q(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.1f} p90 {sorted(xs)[int(len(xs) * 0.9)]:.1f} ms"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=60)
    p.add_argument("--no-fsync", action="store_true")
    args = p.parse_args()
    if args.no_fsync:
        os.fsync = lambda fd: None
    answered, removed = asyncio.run(measure(args.runs))
    print(
        f"Run answered: {_q(answered)}; run..removed: {_q(removed)}; load {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
