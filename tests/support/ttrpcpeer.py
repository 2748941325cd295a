"""The Go ttrpc peer (tests/go/ttrpcpeer) and the matching Python test service.

Both sides implement ``pyshim.test.v1.Echo`` over well-known protobuf types only:

- ``Echo(BytesValue) -> BytesValue``: the payload back
- ``Sleep(Int64Value) -> Int64Value``: after that many milliseconds (or the deadline)
- ``Fail(StringValue "<code> <message>") -> error``: that status
- ``Metadata(Empty) -> StringValue``: JSON of the request metadata (key -> [values])
- ``Deadline(Empty) -> StringValue``: JSON ``{"has_deadline", "remaining_ms"}``
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import empty_pb2, wrappers_pb2

from protocol.ttrpc.server import Method, RequestContext
from protocol.ttrpc.status import TtrpcError

SERVICE = "pyshim.test.v1.Echo"
GO_SOURCE = Path(__file__).resolve().parents[1] / "go" / "ttrpcpeer"
DEBIAN_GOPATH = "/usr/share/gocode"


class PeerError(RuntimeError):
    """The Go peer could not be built or started (a test failure, never a skip)."""


def build_go_peer(work_dir: Path) -> Path:
    """Compile the peer in GOPATH mode against Debian's ttrpc; returns the binary."""
    go = shutil.which("go")
    if go is None:
        raise PeerError("go is not installed (apt-get install golang-go)")
    if not Path(DEBIAN_GOPATH, "src/github.com/containerd/ttrpc").is_dir():
        raise PeerError(
            f"Debian's Go ttrpc is missing under {DEBIAN_GOPATH}"
            " (apt-get install golang-github-containerd-ttrpc-dev)"
        )
    gopath = work_dir / "gopath"
    (gopath / "src").mkdir(parents=True, exist_ok=True)
    binary = work_dir / "ttrpcpeer"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(work_dir),
        "GO111MODULE": "off",
        "GOPATH": f"{DEBIAN_GOPATH}:{gopath}",
        "GOCACHE": str(work_dir / "gocache"),
        "GOFLAGS": "",
        "CGO_ENABLED": "0",
    }
    proc = subprocess.run(
        [go, "build", "-o", str(binary), "."],
        cwd=GO_SOURCE,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise PeerError(f"go build failed ({proc.returncode}):\n{proc.stderr}")
    return binary


@contextmanager
def go_server(binary: Path, socket_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Run ``ttrpcpeer server`` until the block ends; its stderr goes to ``<socket>.log``
    (a file, so a chatty peer can never block on a full pipe)."""
    log_path = socket_path.with_suffix(".log")
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(binary), "server", "-socket", str(socket_path)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "READY":
            proc.kill()
            proc.wait()
            raise PeerError(f"Go server did not start: {line!r} {log_path.read_text()}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass(frozen=True)
class Cancelled:
    sleep_ms: int
    had_deadline: bool
    after_s: float


@dataclass
class EchoService:
    """The Python implementation; records what its handlers observed."""

    cancelled: list[Cancelled] = field(default_factory=list)
    metadata_seen: list[dict[str, list[str]]] = field(default_factory=list)

    def methods(self) -> dict[str, Method[Any, Any]]:
        return {
            "Echo": Method(wrappers_pb2.BytesValue, self.echo),
            "Sleep": Method(wrappers_pb2.Int64Value, self.sleep),
            "Fail": Method(wrappers_pb2.StringValue, self.fail),
            "Metadata": Method(empty_pb2.Empty, self.metadata),
            "Deadline": Method(empty_pb2.Empty, self.deadline),
        }

    async def echo(
        self, ctx: RequestContext, req: wrappers_pb2.BytesValue
    ) -> wrappers_pb2.BytesValue:
        return req

    async def sleep(
        self, ctx: RequestContext, req: wrappers_pb2.Int64Value
    ) -> wrappers_pb2.Int64Value:
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            await asyncio.sleep(req.value / 1000)
        except asyncio.CancelledError:
            self.cancelled.append(
                Cancelled(req.value, ctx.deadline is not None, loop.time() - start)
            )
            raise
        return req

    async def fail(self, ctx: RequestContext, req: wrappers_pb2.StringValue) -> empty_pb2.Empty:
        code, _, message = req.value.partition(" ")
        raise TtrpcError(int(code), message)

    async def metadata(self, ctx: RequestContext, req: empty_pb2.Empty) -> wrappers_pb2.StringValue:
        seen = {key: list(values) for key, values in ctx.metadata.items()}
        self.metadata_seen.append(seen)
        return wrappers_pb2.StringValue(value=json.dumps(seen))

    async def deadline(self, ctx: RequestContext, req: empty_pb2.Empty) -> wrappers_pb2.StringValue:
        info: dict[str, object] = {"has_deadline": ctx.deadline is not None, "remaining_ms": 0.0}
        if ctx.deadline is not None:
            info["remaining_ms"] = (ctx.deadline - asyncio.get_running_loop().time()) * 1000
        return wrappers_pb2.StringValue(value=json.dumps(info))
