"""What containerd 2.3 gives or asks a shim beyond 1.6, side by side with its own Go
shim (docs/containerd-2.md): bootstrap and task API v3, `-info`, the sandbox API."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from protocol import wire
from protocol.proto.task.v2 import shim_pb2  # v3 has the same messages
from protocol.ttrpc.client import Client
from protocol.ttrpc.status import Code, TtrpcError
from shim.boot.start import socket_address
from tests.support.containerd import Containerd

# Every test here is about containerd 2.3 alone (the `containerd` fixture's host).
pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("containerd", ["2.3"], indirect=True),
]

PYSHIM = "io.containerd.pyshim.v1"
GO_SHIM = "io.containerd.runc.v2"
TASK_V3 = "containerd.task.v3.Task"
SANDBOX = "containerd.runtime.sandbox.v1.Sandbox"
FEATURES_URL = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"


def _bootstrap(ctrd: Containerd, cid: str) -> dict[str, object]:
    """What containerd 2.x recorded of the shim's start answer (it writes this file)."""
    found: dict[str, object] = json.loads((ctrd.bundle(cid) / "bootstrap.json").read_text())
    return found


def _fields(data: bytes) -> dict[int, list[int | bytes]]:
    out: dict[int, list[int | bytes]] = {}
    for number, _, value in wire.iter_fields(data):
        out.setdefault(number, []).append(value)
    return out


async def test_task_api_v3_is_served_to_containerd_2_3(
    containerd: Containerd, busybox_image: str
) -> None:
    """pyshim answers the bootstrap like the Go shim of the same containerd, which then
    speaks containerd.task.v3.Task to it; the socket is in the socket_dir it was given."""
    for runtime, cid in ((PYSHIM, "py"), (GO_SHIM, "go")):
        containerd.ctr("run", "-d", "--runtime", runtime, busybox_image, cid, "sleep", "300")
    py, go = _bootstrap(containerd, "py"), _bootstrap(containerd, "go")
    assert (py["version"], py["protocol"]) == (go["version"], go["protocol"]) == (3, "ttrpc")
    expected = socket_address(containerd.address, containerd.namespace, "py", containerd.socket_dir)
    assert py["address"] == expected
    # The address file stays the bare address (what 1.6/1.7 would read on restart).
    assert (containerd.bundle("py") / "address").read_text() == expected

    client = await Client.connect(str(py["address"]).removeprefix("unix://"), timeout=10)
    try:
        state = await client.call(
            TASK_V3, "State", shim_pb2.StateRequest(id="py"), shim_pb2.StateResponse, timeout=10
        )
    finally:
        client.close()
    pids = {
        f[0]: int(f[1])
        for f in map(str.split, containerd.ctr("tasks", "ls").stdout.splitlines()[1:])
    }
    assert (state.pid, state.status) == (pids["py"], 2)  # RUNNING
    log = containerd.log_text()
    assert "connecting to shim py" in log
    line = next(ln for ln in log.splitlines() if "connecting to shim py" in ln)
    assert "version=3" in line, line


async def test_sandbox_api_is_refused_as_the_go_shim_refuses_it(
    containerd: Containerd, busybox_image: str
) -> None:
    """containerd 2.3 calls the sandbox API only with CRI sandboxer = "shim"; its Go
    shim does not serve it. pyshim answers the same status and message."""
    answers = []
    for runtime, cid in ((PYSHIM, "py"), (GO_SHIM, "go")):
        containerd.ctr("run", "-d", "--runtime", runtime, busybox_image, cid, "sleep", "300")
        address = str(_bootstrap(containerd, cid)["address"]).removeprefix("unix://")
        client = await Client.connect(address, timeout=10)
        try:
            with pytest.raises(TtrpcError) as refused:
                await client.call(
                    SANDBOX, "CreateSandbox", empty_pb2.Empty(), empty_pb2.Empty, timeout=10
                )
        finally:
            client.close()
        answers.append((refused.value.code, refused.value.message))
    assert answers[0] == answers[1] == (Code.UNIMPLEMENTED, f"service {SANDBOX}")


def test_info_reads_like_the_go_shims(containerd: Containerd) -> None:
    """`-info`: RuntimeInfo with the name, a version and runc's features under the
    same type URL as containerd 2.3's containerd-shim-runc-v2 prints."""
    assert containerd.host.bin_dir is not None
    go = subprocess.run(
        [containerd.host.go_shim, "-info"], input=b"", capture_output=True, timeout=30, check=True
    )
    py_bin = Path(containerd.env()["PATH"].split(":", 1)[0]) / "containerd-shim-pyshim-v1"
    py = subprocess.run(
        [str(py_bin), "-info"], input=b"", capture_output=True, timeout=30, check=True
    )
    assert py.stderr == b""
    go_info, py_info = _fields(go.stdout), _fields(py.stdout)
    assert go_info[1] == [GO_SHIM.encode()] and py_info[1] == [PYSHIM.encode()]
    assert set(go_info) == set(py_info) == {1, 2, 4}
    go_features = wire.decode_any(bytes(go_info[4][0]))
    py_features = wire.decode_any(bytes(py_info[4][0]))
    assert go_features[0] == py_features[0] == FEATURES_URL
    # Both are runc's own `runc features` (the Go shim re-encodes the same JSON).
    assert json.loads(go_features[1]) == json.loads(py_features[1])
