"""Stats, OOM, Update, Pause/Resume, Pids and Checkpoint through containerd 1.6 + ctr."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.containerd import Containerd
from tests.support.ctr_events import CtrEvents
from tests.support.hosts import every_host

pytestmark = pytest.mark.integration

PYSHIM = "io.containerd.pyshim.v1"
GO_SHIM = "io.containerd.runc.v2"
MEMORY_CGROUP = Path("/sys/fs/cgroup/memory")
# This host's hierarchy: v1 here, the unified v2 one in the VM tier (scripts/vm.sh).
CGROUP_V2 = Path("/sys/fs/cgroup/cgroup.controllers").is_file()


class Events(CtrEvents):
    """`ctr events` in the background (it gives no readiness signal: see ``events``)."""

    def wait_topic(self, container_id: str, topic: str, timeout: float = 20.0) -> None:
        wait_until(f"{topic} for {container_id}", lambda: topic in self.topics(container_id),
                   timeout)  # fmt: skip


@pytest.fixture
def events(containerd: Containerd) -> Iterator[Events]:
    ev = Events(containerd)
    try:
        # Subscribed once a namespace event it could only see live shows up.
        probe = f"probe-{time.monotonic_ns()}"
        deadline = time.monotonic() + 15
        while not any(probe in ln for ln in ev.lines):
            if time.monotonic() > deadline:
                pytest.fail("ctr events never showed the probe namespace")
            containerd.ctr("namespaces", "create", probe, check=False)
            containerd.ctr("namespaces", "rm", probe, check=False)
            time.sleep(0.1)
        yield ev
    finally:
        ev.close()


def wait_until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def task_status(ctrd: Containerd, cid: str) -> str:
    for line in ctrd.ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return fields[-1]
    return "<missing>"


def metrics_table(ctrd: Containerd, cid: str) -> dict[str, str]:
    out = ctrd.ctr("task", "metrics", cid).stdout
    rows = {}
    for line in out.split("METRIC", 1)[1].splitlines()[1:]:
        name, _, value = line.strip().partition(" ")
        if name:
            rows[name] = value.strip()
    return rows


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: obj}


def metrics_json(ctrd: Containerd, cid: str) -> dict[str, Any]:
    raw = json.loads(ctrd.ctr("task", "metrics", "--format", "json", cid).stdout)
    return flatten(raw)


def memory_cgroup(ctrd: Containerd, cid: str) -> Path:
    # ctr puts a container at /<namespace>/<id> in every v1 hierarchy (and in v2's).
    if CGROUP_V2:
        return MEMORY_CGROUP.parent / ctrd.namespace / cid
    return MEMORY_CGROUP / ctrd.namespace / cid


def memory_limit(ctrd: Containerd, cid: str) -> int:
    name = "memory.max" if CGROUP_V2 else "memory.limit_in_bytes"
    return int((memory_cgroup(ctrd, cid) / name).read_text())


# ctr's table names the same figures differently on each hierarchy.
TABLE_LIMIT = "memory.usage_limit" if CGROUP_V2 else "memory.limit_in_bytes"


MiB = 1 << 20


def update_memory(ctrd: Containerd, cid: str, limit: int) -> None:
    """containerd's Tasks.Update over gRPC: what `ctr task update` (not in ctr 1.6) does."""
    from protocol.proto.task.v2 import shim_pb2

    # containerd.services.tasks.v1.UpdateTaskRequest is wire-identical to the shim's
    # (1 container_id, 2 resources Any, 3 annotations).
    request = shim_pb2.UpdateTaskRequest(id=cid)
    request.resources.type_url = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
    request.resources.value = json.dumps({"memory": {"limit": limit}}).encode()
    ctrd.tasks_call("Update", request.SerializeToString(), timeout=30)


@every_host
def test_metrics_are_real_and_shaped_like_the_go_shims(
    containerd: Containerd, busybox_image: str
) -> None:
    for runtime, cid in ((PYSHIM, "py"), (GO_SHIM, "go")):
        containerd.ctr("run", "-d", "--memory-limit", str(64 * MiB), "--runtime", runtime,
                       busybox_image, cid, "sleep", "300")  # fmt: skip
    wait_until("both running", lambda: all(task_status(containerd, c) == "RUNNING"
                                          for c in ("py", "go")))  # fmt: skip

    table = metrics_table(containerd, "py")
    usage, cpu = ("memory.usage", "cpu.usage_usec") if CGROUP_V2 else (
        "memory.usage_in_bytes", "cpuacct.usage")  # fmt: skip
    assert int(table[usage]) > 0, table
    assert int(table[TABLE_LIMIT]) == 64 * MiB, table
    assert int(table[cpu]) > 0, table
    assert table["pids.current"] == "1", table
    assert memory_limit(containerd, "py") == 64 * MiB
    if CGROUP_V2:
        return  # the v2 figures beside the Go shim's: tests/guest/test_cgroup_v2.py

    py, go = metrics_json(containerd, "py"), metrics_json(containerd, "go")
    # Fields the Go shim fills for any live container (zero-valued ones are omitted by
    # ctr's JSON output, so only ever-non-zero figures are compared by presence).
    always = [
        "memory.usage.usage",
        "memory.usage.limit",
        "memory.usage.max",
        "memory.kernel.usage",
        "memory.kernel.limit",
        "memory.swap.limit",
        "memory.hierarchical_memory_limit",
        "memory.pg_fault",
        "memory.total_pg_fault",
        "cpu.usage.total",
        "cpu.usage.per_cpu",
        "pids.current",
    ]
    for key in always:
        assert key in go, (key, sorted(go))
        assert key in py, (key, sorted(py))
    for key in ("memory.usage.limit", "memory.hierarchical_memory_limit", "pids.current"):
        assert py[key] == go[key], key
    assert len(py["cpu.usage.per_cpu"]) == len(go["cpu.usage.per_cpu"])
    # Nothing outside what the Go shim can send shows up (memory_oom_control aside,
    # which is all zeros without an OOM and so is omitted).
    sections = {k.split(".")[0] for k in py}
    assert sections <= {"memory", "cpu", "pids", "blkio", "hugetlb", "memory_oom_control"}


@every_host
def test_oom_kill_publishes_oom_before_exit_137(
    containerd: Containerd, busybox_image: str, events: Events
) -> None:
    argv = ["run", "--rm", "--memory-limit", str(16 * MiB), "--runtime", PYSHIM,
            busybox_image, "oom1", "tail", "/dev/zero"]  # fmt: skip
    res = containerd.ctr(*argv, check=False, timeout=120)
    assert res.returncode == 137, (res.returncode, res.stdout, res.stderr)
    events.wait_topic("oom1", "/tasks/delete")
    topics = events.topics("oom1")
    assert "/tasks/oom" in topics, topics
    assert topics.index("/tasks/oom") < topics.index("/tasks/exit"), topics
    exit_line = next(ln for ln in events.lines if "/tasks/exit" in ln and '"oom1"' in ln)
    assert '"exit_status":137' in exit_line, exit_line


def test_no_oom_event_for_a_plain_kill(
    containerd: Containerd, busybox_image: str, events: Events
) -> None:
    containerd.ctr("run", "-d", "--memory-limit", str(16 * MiB), "--runtime", PYSHIM,
                   busybox_image, "k1", "sleep", "300")  # fmt: skip
    containerd.ctr("task", "kill", "-s", "SIGKILL", "k1")
    events.wait_topic("k1", "/tasks/exit")
    containerd.ctr("task", "delete", "k1")
    events.wait_topic("k1", "/tasks/delete")
    assert "/tasks/oom" not in events.topics("k1"), events.topics("k1")


@every_host
def test_update_pause_resume_ps_checkpoint(
    containerd: Containerd, busybox_image: str, events: Events
) -> None:
    ctr = containerd.ctr
    ctr("run", "-d", "--memory-limit", str(64 * MiB), "--runtime", PYSHIM,
        busybox_image, "c1", "sleep", "300")  # fmt: skip
    wait_until("c1 running", lambda: task_status(containerd, "c1") == "RUNNING")

    # Update reaches the cgroup and Stats reports the new limit.
    update_memory(containerd, "c1", 48 * MiB)
    assert memory_limit(containerd, "c1") == 48 * MiB
    assert int(metrics_table(containerd, "c1")[TABLE_LIMIT]) == 48 * MiB

    # Pids: the init plain, an exec with its ProcessDetails.
    ctr("task", "exec", "-d", "--exec-id", "e1", "c1", "sleep", "300")
    ps = ctr("task", "ps", "c1").stdout
    rows = [ln.split(None, 1) for ln in ps.splitlines()[1:] if ln.strip()]
    assert len(rows) == 2, ps
    init_pid = int(ctr("task", "ls").stdout.split("c1", 1)[1].split()[0])
    by_pid = {int(r[0]): (r[1] if len(r) > 1 else "") for r in rows}
    assert init_pid in by_pid and "e1" not in by_pid[init_pid], ps
    (exec_info,) = [info for pid, info in by_pid.items() if pid != init_pid]
    assert re.search(r"\be1\b", exec_info), ps

    # Pause freezes every process of the container; resume thaws them.
    ctr("task", "pause", "c1")
    assert task_status(containerd, "c1") == "PAUSED"
    for pid in by_pid:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state in ("D", "S"), (pid, state)
    if CGROUP_V2:
        freezer = memory_cgroup(containerd, "c1") / "cgroup.freeze"
        frozen, thawed = "1", "0"
    else:
        freezer = Path("/sys/fs/cgroup/freezer") / containerd.namespace / "c1" / "freezer.state"
        frozen, thawed = "FROZEN", "THAWED"
    assert freezer.read_text().strip() == frozen
    again = ctr("task", "pause", "c1", check=False)
    assert again.returncode != 0 and "cannot pause a paused container" in again.stderr
    ctr("task", "resume", "c1")
    assert task_status(containerd, "c1") == "RUNNING"
    assert freezer.read_text().strip() == thawed
    events.wait_topic("c1", "/tasks/resumed")
    topics = events.topics("c1")
    assert topics.index("/tasks/paused") < topics.index("/tasks/resumed"), topics

    # Checkpoint reaches runc, which cannot checkpoint without CRIU (not installed on
    # this host): runc's error comes back with where CRIU's log is kept, and the
    # container, paused by ctr around the attempt, runs on.
    cp = ctr("task", "checkpoint", "c1", check=False)
    assert cp.returncode != 0
    assert f"path= {containerd.bundle('c1')}/criu-dump.log" in cp.stderr, cp.stderr
    assert "did not terminate successfully" in cp.stderr, cp.stderr
    assert task_status(containerd, "c1") == "RUNNING"

    ctr("task", "kill", "-s", "SIGKILL", "c1")
    wait_until("c1 stopped", lambda: task_status(containerd, "c1") == "STOPPED")
    # Update of a stopped container is refused as the reference does.
    import grpc

    with pytest.raises(grpc.RpcError) as refused:
        update_memory(containerd, "c1", 32 * MiB)
    assert "cannot update a stopped container" in str(refused.value.details())
    ctr("task", "delete", "c1")
    # The cgroup is gone with the container; so is the task.
    assert not memory_cgroup(containerd, "c1").exists()


OOM_AT_ONCE_RUNS = 50


def test_oom_at_once_is_reported_every_time(
    containerd: Containerd, busybox_image: str, events: Events
) -> None:
    # The process allocates past its limit as soon as it runs, so the kill often lands
    # before Start has returned: the watch must be there from Create on.
    missing = []
    for i in range(OOM_AT_ONCE_RUNS):
        cid = f"oomnow{i}"
        # 16 MiB: on cgroup v2 less can OOM-kill runc's own init before the container.
        argv = ["run", "--rm", "--memory-limit", str(16 * MiB), "--runtime", PYSHIM,
                busybox_image, cid, "tail", "/dev/zero"]  # fmt: skip
        res = containerd.ctr(*argv, check=False, timeout=120)
        assert res.returncode == 137, (cid, res.returncode, res.stdout, res.stderr)
        events.wait_topic(cid, "/tasks/delete")
        topics = events.topics(cid)
        if "/tasks/oom" not in topics or topics.index("/tasks/oom") > topics.index("/tasks/exit"):
            missing.append((cid, topics))
    assert not missing, f"{len(missing)} of {OOM_AT_ONCE_RUNS} without /tasks/oom first: {missing}"
