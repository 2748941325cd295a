"""cgroup v2 under systemd, side by side with containerd's Go shim (issue 25).

These run in the VM tier (`scripts/vm.sh test`): a guest with its own kernel, systemd,
a unified cgroup v2 hierarchy and the suite's containerd. pytest does not collect this
directory unless it is named (pyproject's norecursedirs), and on a host without cgroup
v2 every test here fails, as any integration test whose setup is missing does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.test_stats_oom import GO_SHIM, PYSHIM, Events, task_status, wait_until
from tests.support.containerd import Containerd

pytestmark = pytest.mark.integration

CGROUP_ROOT = Path("/sys/fs/cgroup")
MiB = 1 << 20
U64_MAX = (1 << 64) - 1


@pytest.fixture(autouse=True)
def _cgroup_v2() -> None:
    if not (CGROUP_ROOT / "cgroup.controllers").is_file():
        pytest.fail("needs a unified cgroup v2 hierarchy: run through scripts/vm.sh test")


def init_pid(ctrd: Containerd, cid: str) -> int:
    for line in ctrd.ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return int(fields[1])
    raise AssertionError(f"no task {cid}")


def cgroup_of(pid: int) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return CGROUP_ROOT / line[3:].lstrip("/")
    raise AssertionError(f"pid {pid} has no cgroup v2 entry")


def flat_keyed(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}


@pytest.fixture(params=["cgroupfs", "systemd"])
def driver(request: pytest.FixtureRequest) -> str:
    """runc's cgroup driver, chosen the ways containerd users choose it."""
    assert isinstance(request.param, str)
    return request.param


def driver_flags(ctrd: Containerd, driver: str, runtime: str, cid: str, tmp: Path) -> list[str]:
    """ctr's flags for `driver`: pyshim takes SystemdCgroup from a runtime options TOML
    (ctr gives a runtime it does not know as runc only that), the Go shim from ctr's
    runc flag. Either way the container is then the scope system.slice/<prefix>-<id>."""
    if driver == "cgroupfs":
        return []
    cgroup = ["--cgroup", f"system.slice:pyshim{ctrd.namespace}:{cid}"]
    if runtime == GO_SHIM:
        return ["--runc-systemd-cgroup", *cgroup]
    config = tmp / "systemd-cgroup.toml"
    config.write_text("SystemdCgroup = true\n")
    return ["--runtime-config-path", str(config), *cgroup]


def run_one(
    ctrd: Containerd, image: str, runtime: str, cid: str, driver: str, tmp: Path, *flags: str
) -> None:
    ctrd.ctr("run", "-d", *flags, *driver_flags(ctrd, driver, runtime, cid, tmp),
             "--runtime", runtime, image, cid, "sleep", "300")  # fmt: skip
    wait_until(f"{cid} running", lambda: task_status(ctrd, cid) == "RUNNING")
    group = cgroup_of(init_pid(ctrd, cid))
    if driver == "systemd":
        assert group == CGROUP_ROOT / "system.slice" / f"pyshim{ctrd.namespace}-{cid}.scope"
    else:
        assert group == CGROUP_ROOT / ctrd.namespace / cid


def run_pair(ctrd: Containerd, image: str, driver: str, tmp: Path, *flags: str) -> dict[str, Path]:
    """The same container under pyshim ("py") and the Go shim ("go"): their cgroups."""
    for runtime, cid in ((PYSHIM, "py"), (GO_SHIM, "go")):
        run_one(ctrd, image, runtime, cid, driver, tmp, *flags)
    return {cid: cgroup_of(init_pid(ctrd, cid)) for cid in ("py", "go")}


def pids_max(group: Path) -> int:
    raw = (group / "pids.max").read_text().strip()
    return U64_MAX if raw == "max" else int(raw)


def metrics(ctrd: Containerd, cid: str) -> dict[str, Any]:
    data = json.loads(ctrd.ctr("task", "metrics", "--format", "json", cid).stdout)
    assert isinstance(data, dict)
    return data


def update(ctrd: Containerd, cid: str, resources: bytes) -> None:
    """containerd's Tasks.Update over gRPC (ctr 1.7 has no `task update`)."""
    from protocol.proto.task.v2 import shim_pb2

    request = shim_pb2.UpdateTaskRequest(id=cid)
    request.resources.type_url = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
    request.resources.value = resources
    ctrd.tasks_call("Update", request.SerializeToString(), timeout=30)


def test_v2_metrics_are_shaped_and_valued_like_the_go_shims(
    containerd: Containerd, busybox_image: str, driver: str, tmp_path: Path
) -> None:
    groups = run_pair(containerd, busybox_image, driver, tmp_path, "--memory-limit", str(64 * MiB))
    # ctr leaves out zeros, so a key's absence proves nothing on its own. Counters
    # that only grow, read before the metrics, tell: one already above zero must be
    # in pyshim's figures. memory.stat's sizes go up and down (exempt here: 0), and
    # what is not in a stat file (usage, limits) is always required (default 1).
    counters = {
        "cpu": flat_keyed(groups["py"] / "cpu.stat"),
        "memory": {k: v if k.startswith(("pg", "workingset_", "thp_")) else 0
                   for k, v in flat_keyed(groups["py"] / "memory.stat").items()},
    }  # fmt: skip
    py, go = metrics(containerd, "py"), metrics(containerd, "go")
    # The same sections, empty ones included (ctr prints an empty io or rdma as {}).
    assert sorted(py) == sorted(go), (py, go)
    # Limits and counts of the same container are the same figures, "max" included
    # (systemd gives a scope its DefaultTasksMax).
    want = {"current": 1, "limit": pids_max(groups["py"])}
    assert py["pids"] == go["pids"] == want, (py["pids"], go["pids"], want)
    if driver == "cgroupfs":
        assert want["limit"] == U64_MAX
    for key in ("usage_limit", "swap_limit"):
        assert py["memory"].get(key) == go["memory"].get(key), key
    assert py["memory"]["usage_limit"] == 64 * MiB
    assert int((groups["py"] / "memory.max").read_text()) == 64 * MiB
    # Every figure the Go shim reports for its container, pyshim reports for its own
    # unless it was still zero there.
    for section in ("cpu", "memory"):
        missing = {k for k in set(go[section]) - set(py[section])
                   if counters[section].get(k, 1) > 0}  # fmt: skip
        assert not missing, (section, missing, py[section], go[section])
    assert py["cpu"]["usage_usec"] > 0


def test_update_writes_the_go_shims_values_and_refuses_bad_json_before_runc(
    containerd: Containerd, busybox_image: str, driver: str, tmp_path: Path
) -> None:
    groups = run_pair(containerd, busybox_image, driver, tmp_path, "--memory-limit", str(64 * MiB))
    resources = {"memory": {"limit": 48 * MiB}, "cpu": {"quota": 50000, "period": 100000},
                 "pids": {"limit": 20}}  # fmt: skip
    for cid in ("py", "go"):
        update(containerd, cid, json.dumps(resources).encode())
    for name in ("memory.max", "cpu.max", "pids.max"):
        py, go = ((groups[c] / name).read_text() for c in ("py", "go"))
        assert py == go, (name, py, go)
    assert (groups["py"] / "memory.max").read_text().strip() == str(48 * MiB)
    got = metrics(containerd, "py")
    assert (got["memory"]["usage_limit"], got["pids"]["limit"]) == (48 * MiB, 20)

    errors = {}
    for cid in ("py", "go"):
        with pytest.raises(grpc.RpcError) as refused:
            update(containerd, cid, b"not json")
        errors[cid] = str(refused.value.details())
    # The Go shim's JSON decoder speaks first; so does pyshim's, before runc runs.
    assert "invalid character 'o' in literal null" in errors["go"], errors
    assert "resources are not valid JSON" in errors["py"], errors
    assert "runc" not in errors["py"] and "OCI runtime" not in errors["py"], errors
    assert (groups["py"] / "memory.max").read_text().strip() == str(48 * MiB)


def test_pause_and_resume_through_cgroup_freeze(
    containerd: Containerd, busybox_image: str, events: Events, driver: str, tmp_path: Path
) -> None:
    ctr = containerd.ctr
    run_one(containerd, busybox_image, PYSHIM, "p1", driver, tmp_path)
    ctr("task", "exec", "-d", "--exec-id", "e1", "p1", "sleep", "300")
    group = cgroup_of(init_pid(containerd, "p1"))
    pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
    assert len(pids) == 2, pids
    ctr("task", "pause", "p1")
    assert task_status(containerd, "p1") == "PAUSED"
    assert (group / "cgroup.freeze").read_text().strip() == "1"
    assert "frozen 1" in (group / "cgroup.events").read_text()
    ctr("task", "resume", "p1")
    assert task_status(containerd, "p1") == "RUNNING"
    assert (group / "cgroup.freeze").read_text().strip() == "0"
    assert "frozen 0" in (group / "cgroup.events").read_text()
    events.wait_topic("p1", "/tasks/resumed")
    ctr("task", "kill", "-s", "SIGKILL", "p1")
    wait_until("p1 stopped", lambda: task_status(containerd, "p1") == "STOPPED")
    ctr("task", "delete", "p1")
    wait_until("p1's cgroup removed", lambda: not group.exists())


def test_oom_in_an_exec_is_published_from_memory_events(
    containerd: Containerd, busybox_image: str, events: Events, driver: str, tmp_path: Path
) -> None:
    ctr = containerd.ctr
    run_one(containerd, busybox_image, PYSHIM, "o1", driver, tmp_path,
            "--memory-limit", str(16 * MiB))  # fmt: skip
    group = cgroup_of(init_pid(containerd, "o1"))
    res = ctr("task", "exec", "--exec-id", "hog", "o1", "tail", "/dev/zero",
              check=False, timeout=120)  # fmt: skip
    assert res.returncode == 137, (res.returncode, res.stderr)
    events.wait_topic("o1", "/tasks/oom")
    assert "oom_kill 1" in (group / "memory.events").read_text()
    # The init lives on; the OOM is counted in Stats too.
    assert task_status(containerd, "o1") == "RUNNING"
    got = metrics(containerd, "o1")
    assert got["memory_events"]["oom_kill"] == 1, got
    ctr("task", "kill", "-s", "SIGKILL", "o1")
    wait_until("o1 stopped", lambda: task_status(containerd, "o1") == "STOPPED")
    ctr("task", "delete", "o1")


def test_shim_cgroup_from_runtime_options_toml(
    containerd: Containerd, busybox_image: str, tmp_path: Path
) -> None:
    # The shim (not the container) joins ShimCgroup, given here the way ctr passes a
    # runtime it does not know as runc its options: a TOML file's name.
    shims = CGROUP_ROOT / f"pyshim-shims-{containerd.namespace}"
    shims.mkdir()
    try:
        config = tmp_path / "pyshim.toml"
        config.write_text(f'ShimCgroup = "/{shims.name}"\n')
        containerd.ctr("run", "-d", "--runtime", PYSHIM, "--runtime-config-path", str(config),
                       busybox_image, "s1", "sleep", "300")  # fmt: skip
        wait_until("s1 running", lambda: task_status(containerd, "s1") == "RUNNING")
        in_shims = [int(p) for p in (shims / "cgroup.procs").read_text().split()]
        assert set(in_shims) & set(containerd.shim_pids()), (in_shims, containerd.shim_pids())
        assert init_pid(containerd, "s1") not in in_shims
        assert cgroup_of(init_pid(containerd, "s1")) != shims
        containerd.ctr("task", "kill", "-s", "SIGKILL", "s1")
        wait_until("s1 stopped", lambda: task_status(containerd, "s1") == "STOPPED")
        containerd.ctr("task", "delete", "s1")
        containerd.ctr("containers", "delete", "s1")
        wait_until("the shim gone from its cgroup",
                   lambda: not (shims / "cgroup.procs").read_text().split())  # fmt: skip
    finally:
        if shims.exists():
            shims.rmdir()
