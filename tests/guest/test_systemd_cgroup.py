"""pyshim on runc's systemd cgroup driver, configured the ways users configure it.

Through CRI, `SystemdCgroup = true` in the runtime's options section (containerd 1.7
sends it to a runtime it does not know as runc as TOML, runtimeoptions.v1.Options);
through ctr, a `--runtime-config-path` file. The container then lives in a systemd
scope, and the shim finds and reads it there. VM tier only (see test_cgroup_v2.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.proto.cri.runtime.v1 import api_pb2 as cri
from tests.guest.test_cgroup_v2 import CGROUP_ROOT, cgroup_of, init_pid, metrics
from tests.integration.test_stats_oom import PYSHIM, task_status, wait_until
from tests.support.containerd import Containerd
from tests.support.cri import BUSYBOX_REF, CriNode, build_pause_archive

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _systemd_and_cgroup_v2() -> None:
    if (
        not (CGROUP_ROOT / "cgroup.controllers").is_file()
        or not Path("/run/systemd/system").is_dir()
    ):
        pytest.fail("needs cgroup v2 under systemd: run through scripts/vm.sh test")


def test_ctr_runtime_config_path_selects_the_systemd_driver(
    containerd: Containerd, busybox_image: str, tmp_path: Path
) -> None:
    config = tmp_path / "pyshim.toml"
    config.write_text("SystemdCgroup = true\n")
    prefix = f"pyshim{containerd.namespace}"
    ctr = containerd.ctr
    ctr("run", "-d", "--runtime", PYSHIM, "--runtime-config-path", str(config),
        "--cgroup", f"system.slice:{prefix}:sd1", busybox_image, "sd1", "sleep", "300")  # fmt: skip
    wait_until("sd1 running", lambda: task_status(containerd, "sd1") == "RUNNING")
    scope = CGROUP_ROOT / "system.slice" / f"{prefix}-sd1.scope"
    assert cgroup_of(init_pid(containerd, "sd1")) == scope
    ctr("task", "exec", "-d", "--exec-id", "e1", "sd1", "sleep", "300")
    assert len((scope / "cgroup.procs").read_text().split()) == 2
    got = metrics(containerd, "sd1")
    assert got["pids"]["current"] == 2, got
    ctr("task", "pause", "sd1")
    assert (scope / "cgroup.freeze").read_text().strip() == "1"
    ctr("task", "resume", "sd1")
    assert (scope / "cgroup.freeze").read_text().strip() == "0"
    ctr("task", "kill", "-s", "SIGKILL", "sd1")
    wait_until("sd1 stopped", lambda: task_status(containerd, "sd1") == "STOPPED")
    ctr("task", "delete", "sd1")
    wait_until("the scope removed", lambda: not scope.exists())


@pytest.fixture
def systemd_node(integration_env: None, busybox_archive: Path, tmp_path: Path) -> Iterator[CriNode]:
    pause = build_pause_archive(tmp_path / "pause-oci.tar")
    n = CriNode(busybox_archive=busybox_archive, pause_archive=pause, systemd_cgroup=True)
    try:
        yield n
    finally:
        n.close()
        leftovers = n.leftovers()
        assert not leftovers, leftovers


def test_cri_pod_with_systemd_cgroup_true(systemd_node: CriNode) -> None:
    node = systemd_node
    c = node.client
    assert c is not None
    pod_config = node.pod_config("sd")
    pod = c.run_pod_sandbox(pod_config)
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="tool"),
        image=cri.ImageSpec(image=BUSYBOX_REF),
        command=["sleep", "300"],
        log_path="tool/0.log",
        linux=cri.LinuxContainerConfig(
            resources=cri.LinuxContainerResources(memory_limit_in_bytes=64 * MiB)
        ),
    )
    tool = c.create_container(pod, config, pod_config)
    c.start_container(tool)
    # Seen from the node (the container's own cgroup namespace shows it "/").
    status = c.container_status(tool, verbose=True)
    pid = json.loads(status.info["info"])["pid"]
    path = Path(f"/proc/{pid}/cgroup").read_text().strip().removeprefix("0::")
    # runc's systemd driver: the pod's slice inside the node's, the container a scope.
    assert path.endswith(f"/cri-containerd-{tool}.scope"), path
    assert f"/{node.cgroup_parent}/" in path, path
    scope = CGROUP_ROOT / path.lstrip("/")
    assert int((scope / "memory.max").read_text()) == 64 * MiB
    # The shim reads that scope: stats, and the limit an update writes.
    stats = c.container_stats(tool)
    assert stats.memory.working_set_bytes.value > 0, stats
    assert stats.cpu.usage_core_nano_seconds.value > 0, stats
    c.update_container_resources(tool, cri.LinuxContainerResources(memory_limit_in_bytes=96 * MiB))
    assert int((scope / "memory.max").read_text()) == 96 * MiB
    c.stop_container(tool, timeout=1)
    c.remove_container(tool)
    c.stop_pod_sandbox(pod)
    c.remove_pod_sandbox(pod)
    wait_until("the container's scope removed", lambda: not scope.exists())
