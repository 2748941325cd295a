"""Kubernetes' view: containerd's CRI plugin runs pods on pyshim (we play the kubelet)."""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from protocol.proto.cri.runtime.v1 import api_pb2 as cri
from tests.support.cri import (
    BUSYBOX_REF,
    CRI_NAMESPACE,
    PAUSE_REF,
    CriNode,
    build_pause_archive,
    parse_cri_log,
    wait_until,
    ws_exec,
)
from tests.support.hosts import HOST_NAMES, require

pytestmark = pytest.mark.integration

MiB = 1 << 20
WEB_PORT = 8080
PAGE = "hello-from-pyshim-pod"


@pytest.fixture(scope="module")
def pause_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pause_archive(tmp_path_factory.mktemp("pause") / "pause-oci.tar")


@pytest.fixture(params=HOST_NAMES)
def node(
    request: pytest.FixtureRequest,
    integration_env: None,
    busybox_archive: Path,
    pause_archive: Path,
    containerd2_cache: Path,
) -> Iterator[CriNode]:
    """A CRI node on each containerd of the matrix (tests/support/hosts.py)."""
    host = require(request.param, containerd2_cache)
    n = CriNode(busybox_archive=busybox_archive, pause_archive=pause_archive, host=host)
    try:
        yield n
    finally:
        n.close()
        leftovers = n.leftovers()
        assert not leftovers, leftovers


def container_config(
    name: str, command: list[str], *, tty: bool = False, memory: int = 0
) -> cri.ContainerConfig:
    resources = cri.LinuxContainerResources(memory_limit_in_bytes=memory) if memory else None
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name),
        image=cri.ImageSpec(image=BUSYBOX_REF),
        command=command,
        log_path=f"{name}/0.log",
        tty=tty,
        stdin=tty,
        linux=cri.LinuxContainerConfig(resources=resources),
    )


def netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def container_pid(node: CriNode, container_id: str) -> int:
    assert node.client is not None
    info = node.client.container_status(container_id, verbose=True).info
    pid: int = json.loads(info["info"])["pid"]
    return pid


def task_api_versions(node: CriNode, ids: list[str]) -> list[int | None]:
    """The task API version containerd 2.x recorded per task (None: no bootstrap.json)."""
    assert node.containerd is not None
    tasks = node.containerd.state / "io.containerd.runtime.v2.task" / CRI_NAMESPACE
    found: list[int | None] = []
    for cid in ids:
        path = tasks / cid / "bootstrap.json"
        found.append(json.loads(path.read_text())["version"] if path.exists() else None)
    return found


def test_pod_lifecycle_on_pyshim(node: CriNode) -> None:
    c = node.client
    assert c is not None and node.containerd is not None
    assert c.version().runtime_name == "containerd"

    # Images: present locally (never pulled from outside); a pull from a closed local
    # port fails cleanly.
    busybox = c.image_status(BUSYBOX_REF).image
    assert busybox.id.startswith("sha256:") and BUSYBOX_REF in busybox.repo_tags
    assert c.image_status(PAUSE_REF).image.id
    assert not c.image_status("docker.io/library/not-here:1").HasField("image")
    with pytest.raises(grpc.RpcError):
        c.pull_image("127.0.0.1:1/nothing/here:1", timeout=30)

    # -- the pod --------------------------------------------------------------------
    pod_config = node.pod_config("web")
    pod = c.run_pod_sandbox(pod_config)
    status = c.pod_sandbox_status(pod, verbose=True)
    assert status.status.state == cri.SANDBOX_READY
    assert status.status.metadata.name == "web"
    pod_ip = status.status.network.ip
    assert pod_ip.startswith(node.network.prefix + "."), pod_ip
    sandbox_info = json.loads(status.info["info"])
    netns_path = next(
        ns["path"]
        for ns in sandbox_info["runtimeSpec"]["linux"]["namespaces"]
        if ns["type"] == "network"
    )
    assert netns_path.startswith(str(node.containerd.tmp)), netns_path
    assert Path(netns_path).exists()
    assert len(node.bridge_ports()) == 1
    assert node.ipam_leases() == [pod_ip]
    # The sandbox runs on pyshim.
    shims = node.shim_binaries()
    assert shims and all("containerd-shim-pyshim-v1" in argv for argv in shims.values()), shims

    # -- two containers sharing the pod's network --------------------------------------
    web = c.create_container(pod, container_config("web", [
        "sh", "-c",
        f"mkdir -p /tmp/www && echo {PAGE} > /tmp/www/index.html && "
        f"exec busybox httpd -f -p {WEB_PORT} -h /tmp/www",
    ]), pod_config)  # fmt: skip
    tool = c.create_container(pod, container_config("tool", [
        "sh", "-c", "echo out-line; echo err-line >&2; exec sleep 300",
    ], memory=64 * MiB), pod_config)  # fmt: skip
    assert c.container_status(web).status.state == cri.CONTAINER_CREATED
    c.start_container(web)
    c.start_container(tool)
    for cid in (web, tool):
        st = c.container_status(cid).status
        assert st.state == cri.CONTAINER_RUNNING and st.started_at > 0, st
    assert {x.id for x in c.list_containers(pod)} == {web, tool}

    # One pyshim serves the pod. containerd 2.3 speaks task API v3 to it, for the
    # sandbox and the containers it joins to it (the bootstrap.json it writes in each
    # bundle); 1.6 writes none and speaks v2.
    assert len(node.shim_binaries()) == 1, node.shim_binaries()
    expected = 3 if node.host.v2 else None
    assert task_api_versions(node, [pod, web, tool]) == [expected] * 3

    web_pid, tool_pid = container_pid(node, web), container_pid(node, tool)
    assert netns_inode(web_pid) == netns_inode(tool_pid) != netns_inode(os.getpid())

    # localhost is shared: the tool container reaches the web container's server.
    def served_locally() -> bool:
        cmd = ["busybox", "wget", "-qO-", f"http://127.0.0.1:{WEB_PORT}/"]
        r = c.exec_sync(tool, cmd, timeout=10)
        return r.exit_code == 0 and PAGE in r.stdout.decode()

    wait_until("httpd answering inside the pod", served_locally, timeout=20)
    # The pod IP is reachable from the host over our bridge.
    with urllib.request.urlopen(f"http://{pod_ip}:{WEB_PORT}/", timeout=10) as resp:
        assert PAGE in resp.read().decode()

    # -- exec -----------------------------------------------------------------------
    r = c.exec_sync(tool, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 3)
    r = c.exec_sync(tool, ["cat", "/proc/self/cgroup"])
    assert r.exit_code == 0, r
    # Seen from the node: on cgroup v2 the container has a cgroup namespace of its
    # own, and sees its cgroup as "/".
    tool_cgroups = Path(f"/proc/{container_pid(node, tool)}/cgroup").read_text()
    assert node.cgroup_parent in tool_cgroups, tool_cgroups

    url = c.exec(cri.ExecRequest(container_id=tool, cmd=["sh"], tty=True, stdin=True,
                                 stdout=True))  # fmt: skip
    assert url.startswith(f"http://127.0.0.1:{node.stream_port}/exec/"), url
    # The resize and the typed line reach the shim by separate ways (ResizePty, the
    # stdin fifo): wait, bounded, for the size rather than read it once (in a loaded
    # guest the line won, and stty read a 0x0 terminal).
    line = (b'i=0; until [ "$(stty size 2>/dev/null)" = "23 91" ] || [ $i -ge 400 ];'
            b' do i=$((i+1)); sleep 0.05; done;'
            b' echo "size-$(stty size)"; echo tty-$((6*7)); exit 5\n')  # fmt: skip
    result = ws_exec(url, stdin=line, resize=(91, 23))
    text = result.stdout.decode(errors="replace")
    assert "tty-42" in text, text
    assert "size-23 91" in text, text  # the resize reached the exec's pty
    assert result.status.get("status") == "Failure", result.status
    causes = result.status["details"]["causes"]
    assert {"reason": "ExitCode", "message": "5"} in causes, result.status

    attach_url = c.attach(cri.AttachRequest(container_id=web, stdout=True, stderr=True))
    assert attach_url.startswith(f"http://127.0.0.1:{node.stream_port}/attach/"), attach_url

    # -- logs in the kubelet's CRI format ---------------------------------------------
    log_path = Path(pod_config.log_directory) / "tool" / "0.log"
    assert c.container_status(tool).status.log_path == str(log_path)
    wait_until("tool's log lines", lambda: log_path.exists() and
               len(log_path.read_text().splitlines()) >= 2)  # fmt: skip
    lines = parse_cri_log(log_path.read_text())
    assert {(ln.stream, ln.content, ln.partial) for ln in lines} == {
        ("stdout", "out-line", False),
        ("stderr", "err-line", False),
    }
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d)",
                            ln.timestamp) for ln in lines), lines  # fmt: skip

    # -- stats and resources --------------------------------------------------------
    stats = c.container_stats(tool)
    assert stats.attributes.id == tool
    assert stats.cpu.usage_core_nano_seconds.value > 0
    assert stats.memory.working_set_bytes.value > 0
    assert stats.memory.usage_bytes.value > 0
    own = tool_cgroups
    if own.startswith("0::"):  # the unified v2 hierarchy (the VM tier)
        limit_file = Path("/sys/fs/cgroup") / own[3:].strip().lstrip("/") / "memory.max"
    else:
        memory_dir = own.split("memory:/", 1)[1].split("\n", 1)[0]
        limit_file = Path("/sys/fs/cgroup/memory") / memory_dir / "memory.limit_in_bytes"
    assert int(limit_file.read_text()) == 64 * MiB
    c.update_container_resources(tool, cri.LinuxContainerResources(memory_limit_in_bytes=96 * MiB))
    assert int(limit_file.read_text()) == 96 * MiB
    limits = c.container_status(tool).status.resources.linux
    assert limits.memory_limit_in_bytes == 96 * MiB, limits

    # -- stop and remove --------------------------------------------------------------
    c.stop_container(web, timeout=5)
    c.stop_container(tool, timeout=1)
    for cid in (web, tool):
        st = c.container_status(cid).status
        assert st.state == cri.CONTAINER_EXITED and st.finished_at >= st.started_at, st
    # SIGTERM, or SIGKILL once the grace period is over.
    assert {c.container_status(x).status.exit_code for x in (web, tool)} <= {143, 137}
    c.remove_container(web)
    c.remove_container(tool)
    assert c.list_containers(pod) == []
    with pytest.raises(grpc.RpcError) as gone:
        c.container_status(web)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND

    c.stop_pod_sandbox(pod)
    assert c.pod_sandbox_status(pod).status.state == cri.SANDBOX_NOTREADY
    assert not Path(netns_path).exists()
    assert node.bridge_ports() == []
    assert node.ipam_leases() == []
    with pytest.raises(OSError):
        socket.create_connection((pod_ip, WEB_PORT), timeout=2).close()
    c.remove_pod_sandbox(pod)
    assert c.list_pod_sandboxes() == []
    wait_until("shims gone", lambda: not node.shim_binaries(), timeout=20)


def test_oom_killed_container_reports_oomkilled(node: CriNode) -> None:
    c = node.client
    assert c is not None
    pod_config = node.pod_config("oom")
    pod = c.run_pod_sandbox(pod_config)
    hog = c.create_container(pod, container_config("hog", ["tail", "/dev/zero"], memory=16 * MiB),
                             pod_config)  # fmt: skip
    c.start_container(hog)
    wait_until("hog exited",
               lambda: c.container_status(hog).status.state == cri.CONTAINER_EXITED)  # fmt: skip
    st = c.container_status(hog).status
    # CRI derives the reason from the shim's /tasks/oom, which must precede the exit.
    assert (st.exit_code, st.reason) == (137, "OOMKilled"), st
    c.remove_container(hog)
    c.stop_pod_sandbox(pod)
    c.remove_pod_sandbox(pod)
