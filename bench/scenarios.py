"""The benchmark scenarios. Each drives ``ctr`` against the private containerd, the
same way for every runtime; only ``--runtime`` differs.

Latency scenarios take one sample per round per runtime and the runner interleaves
the runtimes (A,B then B,A). Fleet scenarios (idle, pods, scale, restart) manage
their own containers.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ptyprocess import PtyProcess

from bench import ksm
from bench.containerd_env import CtrError, EventWatcher, PrivateContainerd
from bench.procfs import MemoryUsage, read_memory, read_wakeups
from bench.stats import (
    joined_increment_kb,
    per_container_mb,
    pod_grouping_problems,
    pod_owners,
    round_order,
    scale_scenario_name,
    summarize,
)

__all__ = [
    "FLEET_SCENARIOS",
    "IMAGE",
    "LATENCY_SCENARIOS",
    "RUNTIMES",
    "BenchConfig",
    "Context",
    "ScenarioFailed",
    "result_names",
    "run_scenario",
]

IMAGE = "docker.io/library/busybox:latest"
RUNTIMES: dict[str, str] = {"go": "io.containerd.runc.v2", "py": "io.containerd.pyshim.v1"}
IDLE_CMD = ("sleep", "1000000")
# The annotation both shims group containers by (one shim process per pod).
SANDBOX_ANNOTATION = "io.kubernetes.cri.sandbox-id"
# A sample that fails this many times in a row drops that runtime from the scenario,
# so a broken shim does not turn a 10-minute run into an hour of timeouts.
MAX_CONSECUTIVE_FAILURES = 2
# Seconds after starting containers before their shims' memory is read (start-up work:
# GC, lazy imports, goroutines).
SETTLE_S = 2.0


@dataclass
class BenchConfig:
    rounds: int = 10
    restart_rounds: int = 3
    idle_containers: int = 5
    idle_window_s: float = 10.0
    scale_containers: tuple[int, ...] = (20,)
    pods: int = 5
    pod_size: int = 4
    restart_containers: int = 5
    scale_ksm: bool = False
    throughput_mb: int = 64
    image: str = IMAGE
    runtimes: tuple[str, ...] = ("go", "py")


@dataclass
class Context:
    env: PrivateContainerd
    events: EventWatcher
    cfg: BenchConfig
    results: dict[str, Any] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def new_id(self, prefix: str, key: str) -> str:
        cid = f"{prefix}-{key}-{next(self._ids)}"
        self.env.container_ids.add(cid)
        return cid

    def scenario(self, name: str) -> dict[str, Any]:
        body: dict[str, Any] = self.results.setdefault(name, {"metrics": {}, "errors": {}})
        return body

    def record(
        self,
        scenario: str,
        metric: str,
        key: str,
        value: float,
        unit: str,
        *,
        higher_is_better: bool = False,
    ) -> None:
        m = self.scenario(scenario)["metrics"].setdefault(
            metric, {"unit": unit, "higher_is_better": higher_is_better, "samples": {}}
        )
        m["samples"].setdefault(key, []).append(value)

    def error(self, scenario: str, key: str, message: str) -> None:
        self.scenario(scenario)["errors"].setdefault(key, []).append(message[-2000:])

    def finish(self) -> None:
        """Add summaries next to the raw samples."""
        for body in self.results.values():
            for m in body["metrics"].values():
                m["summary"] = {
                    key: s.to_json()
                    for key, values in m["samples"].items()
                    if (s := summarize(values)) is not None
                }

    # -- helpers shared by the scenarios ------------------------------------

    def run_args(self, key: str) -> list[str]:
        return ["--runtime", RUNTIMES[key], "--fifo-dir", str(self.env.fifo_dir)]

    def start_idle(self, key: str, cid: str, extra: Sequence[str] = ()) -> float:
        """``ctr run -d [extra…]`` an idle container; returns the wall time in ms."""
        t0 = time.perf_counter()
        self.env.ctr("run", "-d", *self.run_args(key), *extra, self.cfg.image, cid, *IDLE_CMD)
        return (time.perf_counter() - t0) * 1000

    def shims_of(self, key: str) -> list[int]:
        return [s.pid for s in self.env.shims() if s.runtime == RUNTIMES[key]]

    def helpers_of(self, key: str) -> list[int]:
        """Processes a runtime keeps beside its shims (pyshim's fork template and its
        pre-forked spare daemon)."""
        if RUNTIMES[key] != "io.containerd.pyshim.v1":
            return []
        return self.env.template_pids() + self.env.spare_pids()


class ScenarioFailed(Exception):
    """The scenario ran but its premise did not hold; the details are already in
    the results' errors."""


# -- latency scenarios ------------------------------------------------------


class LatencyScenario:
    name = ""
    description = ""

    def setup(self, ctx: Context, key: str) -> None:
        pass

    def sample(self, ctx: Context, key: str) -> None:
        raise NotImplementedError

    def teardown(self, ctx: Context, key: str) -> None:
        pass


class ColdRun(LatencyScenario):
    name = "cold_run"
    description = "ctr run --rm IMAGE ID true (wall time)"

    def sample(self, ctx: Context, key: str) -> None:
        cid = ctx.new_id("cold", key)
        t0 = time.perf_counter()
        try:
            ctx.env.ctr("run", "--rm", *ctx.run_args(key), ctx.cfg.image, cid, "true")
        except BaseException:
            ctx.env.remove_container(cid)
            raise
        ctx.record(self.name, "wall", key, (time.perf_counter() - t0) * 1000, "ms")


class CreateStart(LatencyScenario):
    name = "create_start"
    description = "ctr container create, then ctr task start -d until RUNNING"

    def sample(self, ctx: Context, key: str) -> None:
        cid = ctx.new_id("cs", key)
        try:
            t0 = time.perf_counter()
            ctx.env.ctr(
                "container", "create", "--runtime", RUNTIMES[key], ctx.cfg.image, cid, *IDLE_CMD
            )
            t1 = time.perf_counter()
            ctx.env.ctr("task", "start", "-d", "--fifo-dir", str(ctx.env.fifo_dir), cid)
            t2 = time.perf_counter()
            status = ctx.env.task_statuses().get(cid)
            if status != "RUNNING":
                raise CtrError(f"task {cid} is {status} after start")
        finally:
            ctx.env.remove_container(cid)
        ctx.record(self.name, "container_create", key, (t1 - t0) * 1000, "ms")
        ctx.record(self.name, "task_start", key, (t2 - t1) * 1000, "ms")
        ctx.record(self.name, "total", key, (t2 - t0) * 1000, "ms")


class KillToExit(LatencyScenario):
    name = "kill_to_exit"
    description = "ctr task kill -s 9 until /tasks/exit is seen by ctr events"

    def sample(self, ctx: Context, key: str) -> None:
        cid = ctx.new_id("kill", key)
        try:
            ctx.start_idle(key, cid)
            ctx.events.clear()
            t0 = time.perf_counter()
            kill = subprocess.Popen(
                ctx.env.ctr_argv("task", "kill", "-s", "9", cid),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=ctx.env.env(),
            )
            try:
                ev = ctx.events.wait_for(
                    "/tasks/exit", lambda p: json.loads(p).get("id") == cid, since=t0, timeout=30
                )
            finally:
                _, err = kill.communicate(timeout=30)
            if kill.returncode != 0:
                raise CtrError(f"ctr task kill failed: {err.decode(errors='replace')}")
        finally:
            ctx.env.remove_container(cid)
        ctx.record(self.name, "kill_to_exit_event", key, (ev.t - t0) * 1000, "ms")


class Exec(LatencyScenario):
    name = "exec"
    description = "ctr task exec --exec-id X ID true in a running container"

    def __init__(self) -> None:
        self._containers: dict[str, str] = {}

    def setup(self, ctx: Context, key: str) -> None:
        cid = ctx.new_id("exec", key)
        self._containers[key] = cid
        ctx.start_idle(key, cid)

    def sample(self, ctx: Context, key: str) -> None:
        cid = self._containers[key]
        exec_id = ctx.new_id("x", key)
        t0 = time.perf_counter()
        ctx.env.ctr(
            "task", "exec", "--fifo-dir", str(ctx.env.fifo_dir), "--exec-id", exec_id, cid, "true"
        )
        ctx.record(self.name, "wall", key, (time.perf_counter() - t0) * 1000, "ms")

    def teardown(self, ctx: Context, key: str) -> None:
        cid = self._containers.pop(key, None)
        if cid is not None:
            ctx.env.remove_container(cid)


class TtyFirstOutput(LatencyScenario):
    name = "tty"
    description = "ctr run -t --rm IMAGE ID echo ready through a pty: time to first byte"

    def sample(self, ctx: Context, key: str) -> None:
        cid = ctx.new_id("tty", key)
        argv = ctx.env.ctr_argv("run", "-t", "--rm", *ctx.run_args(key), ctx.cfg.image, cid)
        argv += ["echo", "ready"]
        t0 = time.perf_counter()
        proc = PtyProcess.spawn(argv, env=ctx.env.env(), dimensions=(24, 80))
        try:
            first = _pty_read_first(proc, timeout=30)
            t_first = time.perf_counter()
            output = first + _pty_drain(proc, timeout=30)
            status = proc.wait()
            t_end = time.perf_counter()
        except BaseException:
            ctx.env.remove_container(cid)
            raise
        finally:
            proc.close(force=True)
        if status != 0 or b"ready" not in output:
            ctx.env.remove_container(cid)
            raise CtrError(f"ctr run -t exited {status}: {output[-500:]!r}")
        ctx.record(self.name, "first_byte", key, (t_first - t0) * 1000, "ms")
        ctx.record(self.name, "wall", key, (t_end - t0) * 1000, "ms")


def _pty_read_first(proc: Any, timeout: float) -> bytes:
    ready, _, _ = select.select([proc.fd], [], [], timeout)
    if not ready:
        raise TimeoutError("no tty output")
    data: bytes = proc.read(4096)
    return data


def _pty_drain(proc: Any, timeout: float) -> bytes:
    chunks: list[bytes] = []
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        ready, _, _ = select.select([proc.fd], [], [], max(0.0, deadline - time.perf_counter()))
        if not ready:
            break
        try:
            chunks.append(proc.read(65536))
        except EOFError:
            return b"".join(chunks)
    raise TimeoutError("tty output did not end")


class StdoutThroughput(LatencyScenario):
    name = "stdout_throughput"
    description = "a container writing N MB to stdout; MB/s as read from ctr's stdout"

    def sample(self, ctx: Context, key: str) -> None:
        cid = ctx.new_id("tput", key)
        block = 65536
        count = ctx.cfg.throughput_mb * (1 << 20) // block
        expected = count * block
        argv = ctx.env.ctr_argv("run", "--rm", *ctx.run_args(key), ctx.cfg.image, cid)
        argv += ["dd", "if=/dev/zero", f"bs={block}", f"count={count}"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ctx.env.env(),
        )
        assert proc.stdout is not None
        received = 0
        t_first = 0.0
        try:
            fd = proc.stdout.fileno()
            while chunk := os.read(fd, 1 << 20):
                if received == 0:
                    t_first = time.perf_counter()
                received += len(chunk)
            t_eof = time.perf_counter()
            _, err = proc.communicate(timeout=60)
        except BaseException:
            proc.kill()
            proc.wait()
            ctx.env.remove_container(cid)
            raise
        if proc.returncode != 0 or received != expected:
            ctx.env.remove_container(cid)
            raise CtrError(
                f"throughput run exited {proc.returncode} after {received}/{expected} bytes: "
                f"{err.decode(errors='replace')[-500:]}"
            )
        ctx.record(
            self.name,
            "rate",
            key,
            received / (t_eof - t_first) / 1e6,
            "MB/s",
            higher_is_better=True,
        )
        ctx.record(self.name, "wall", key, (t_eof - t0) * 1000, "ms")


LATENCY_SCENARIOS: dict[str, Callable[[], LatencyScenario]] = {
    "cold_run": ColdRun,
    "create_start": CreateStart,
    "kill_to_exit": KillToExit,
    "exec": Exec,
    "tty": TtyFirstOutput,
    "stdout_throughput": StdoutThroughput,
}


def run_latency(ctx: Context, scenario: LatencyScenario, log: Callable[[str], None]) -> None:
    active: list[str] = []
    for key in ctx.cfg.runtimes:
        try:
            scenario.setup(ctx, key)
            active.append(key)
        except Exception as exc:
            ctx.error(scenario.name, key, f"setup: {exc}")
            log(f"  {scenario.name}/{key}: setup failed: {exc}")
    failures = dict.fromkeys(active, 0)
    try:
        for rnd in range(ctx.cfg.rounds):
            for key in round_order(rnd, active):
                if failures[key] >= MAX_CONSECUTIVE_FAILURES:
                    continue
                try:
                    scenario.sample(ctx, key)
                    failures[key] = 0
                except Exception as exc:
                    failures[key] += 1
                    ctx.error(scenario.name, key, f"round {rnd}: {exc}")
                    log(f"  {scenario.name}/{key} round {rnd}: {exc}")
    finally:
        for key in active:
            try:
                scenario.teardown(ctx, key)
            except Exception as exc:
                ctx.error(scenario.name, key, f"teardown: {exc}")


# -- fleet scenarios --------------------------------------------------------


def run_idle(ctx: Context, log: Callable[[str], None]) -> None:
    """N idle containers per runtime, all up at once so both runtimes share one
    measurement window: per-shim memory, then context switches and CPU over the window."""
    name = "idle"
    n = ctx.cfg.idle_containers
    started: list[str] = []
    keys = list(ctx.cfg.runtimes)
    try:
        for i in range(n):
            for key in round_order(i, keys):
                cid = ctx.new_id("idle", key)
                started.append(cid)
                try:
                    ctx.start_idle(key, cid)
                except Exception as exc:
                    # One broken runtime must not cost the other its figures.
                    keys.remove(key)
                    ctx.error(name, key, f"start #{i + 1}: {exc}")
                    log(f"  idle/{key}: {exc}")
        time.sleep(SETTLE_S)
        pids = {key: ctx.shims_of(key) for key in keys}
        _settle_ksm(ctx, name, log, [pid for shim_pids in pids.values() for pid in shim_pids])
        for key, shim_pids in pids.items():
            if len(shim_pids) != n:
                ctx.error(name, key, f"found {len(shim_pids)} shim processes for {n} containers")
            for pid in shim_pids:
                mem = read_memory(pid)
                ctx.record(name, "rss_per_shim", key, mem.rss_kb / 1024, "MB")
                ctx.record(name, "pss_per_shim", key, mem.pss_kb / 1024, "MB")
                ctx.record(name, "private_per_shim", key, mem.private_kb / 1024, "MB")
                merging = ksm.read_process(pid)
                ctx.record(name, "ksm_merged_per_shim", key, merging.merged_kb / 1024, "MB")
                ctx.record(name, "ksm_metadata_per_shim", key, merging.metadata_kb / 1024, "MB")
            # The template's share is paid once per node, not per shim: its own row.
            helpers = _total_memory(ctx.helpers_of(key))
            if helpers.rss_kb:
                ctx.record(name, "template_pss", key, helpers.pss_kb / 1024, "MB")
        before = {pid: read_wakeups(pid) for shim_pids in pids.values() for pid in shim_pids}
        ksmd_before = ksm.ksmd_cpu_ticks()
        t0 = time.perf_counter()
        time.sleep(ctx.cfg.idle_window_s)
        elapsed = time.perf_counter() - t0
        tick = os.sysconf("SC_CLK_TCK")
        ksmd_after = ksm.ksmd_cpu_ticks()
        if ksmd_before is not None and ksmd_after is not None and "py" in pids:
            # Node-wide, not per shim; only pyshim's memory is mergeable, so its row.
            ksmd_ms = (ksmd_after - ksmd_before) * 1000 / tick
            ctx.record(name, "ksmd_cpu", "py", ksmd_ms / elapsed, "ms/s")
        for key, shim_pids in pids.items():
            for pid in shim_pids:
                after = read_wakeups(pid)
                b = before[pid]
                ctx.record(
                    name, "wakeups_per_shim", key, (after.switches - b.switches) / elapsed, "/s"
                )
                cpu_ms = (after.cpu_ticks - b.cpu_ticks) * 1000 / tick
                ctx.record(name, "cpu_per_shim", key, cpu_ms / elapsed, "ms/s")
                ctx.record(name, "threads_per_shim", key, after.threads, "")
    finally:
        ctx.env.remove_containers(started)


def _pod_shim(ctx: Context, key: str, pod: str, members: Sequence[str]) -> int | None:
    """The pid of ``pod``'s shim, None unless exactly one serves it."""
    owners = pod_owners({pod: members})
    shims = ctx.env.shims()
    pids = [s.pid for s in shims if s.runtime == RUNTIMES[key] and s.container_id in owners]
    return pids[0] if len(pids) == 1 else None


def run_pods(ctx: Context, log: Callable[[str], None]) -> None:
    """P pods of C idle containers per runtime, grouped by the CRI sandbox-id
    annotation so each pod gets one shim process: memory per container, and the
    time to start a pod's containers one after another.

    The per-container figure spreads over the pods' containers what the runtime's
    processes hold in total, the template included; a pod shim's PSS alone moves with
    how many processes share its pages. So each pod's shim is also read after its
    first container (once settled) and at the end: its private growth per container
    that joined it (``private_per_joined_container``)."""
    name = "pods"
    n_pods, size = ctx.cfg.pods, ctx.cfg.pod_size
    keys = list(ctx.cfg.runtimes)
    pods: dict[str, dict[str, list[str]]] = {key: {} for key in keys}
    # Private KB of a pod's shim serving its first container only: key -> pod -> KB.
    first_private: dict[str, dict[str, int]] = {key: {} for key in keys}
    started: list[str] = []
    misgrouped: list[str] = []
    try:
        for p in range(n_pods):
            for key in round_order(p, keys):
                # Registered like a container id so cleanup finds the pod's shim socket.
                pod = ctx.new_id("pod", key)
                members = pods[key].setdefault(pod, [])
                try:
                    pod_ms = 0.0
                    for i in range(size):
                        cid = ctx.new_id(f"{pod}-c", key)
                        started.append(cid)
                        members.append(cid)
                        ms = ctx.start_idle(
                            key, cid, ("--annotation", f"{SANDBOX_ANNOTATION}={pod}")
                        )
                        pod_ms += ms
                        # The first container spawns the pod's shim; the rest join it.
                        ctx.record(name, "start_first" if i == 0 else "start_joined", key, ms, "ms")
                        if i == 0 and size > 1:
                            time.sleep(SETTLE_S)
                            pid = _pod_shim(ctx, key, pod, members)
                            if pid is not None:
                                first_private[key][pod] = read_memory(pid).private_kb
                    ctx.record(name, "pod_start", key, pod_ms, "ms")
                except Exception as exc:
                    keys.remove(key)
                    ctx.error(name, key, f"pod #{p + 1}: {exc}")
                    log(f"  pods/{key}: {exc}")
        time.sleep(SETTLE_S)  # as idle: let start-up work settle before reading memory
        _settle_ksm(ctx, name, log, [s.pid for s in ctx.env.shims()])
        totals = ctx.scenario(name).setdefault("totals", {})
        for key in keys:
            shims = [s for s in ctx.env.shims() if s.runtime == RUNTIMES[key]]
            ctx.record(name, "shims", key, len(shims), "")
            problems = pod_grouping_problems([s.container_id for s in shims], pods[key])
            if problems:
                misgrouped.append(key)
                msg = f"not one shim per pod: {'; '.join(problems)}"
                ctx.error(name, key, msg)
                log(f"  pods/{key}: FAILED, {msg}")
                continue
            owners = pod_owners(pods[key])
            for shim in shims:
                mem = read_memory(shim.pid)
                ctx.record(name, "pod_shim_private", key, mem.private_kb / 1024, "MB")
                first = first_private[key].get(owners[shim.container_id])
                if first is not None:
                    grown = joined_increment_kb(first, mem.private_kb, size)
                    ctx.record(name, "private_per_joined_container", key, grown / 1024, "MB")
            helpers = _total_memory(ctx.helpers_of(key))
            if helpers.rss_kb:
                # Paid once per node: its share of the per-container figure shrinks as
                # pods are added, while the shims' private memory does not.
                ctx.record(name, "template_private", key, helpers.private_kb / 1024, "MB")
                ctx.record(name, "template_pss", key, helpers.pss_kb / 1024, "MB")
            containers = n_pods * size
            total = _total_memory([s.pid for s in shims] + ctx.helpers_of(key))
            totals[key] = {
                "pods": n_pods,
                "pod_size": size,
                "rss_kb": total.rss_kb,
                "pss_kb": total.pss_kb,
                "private_kb": total.private_kb,
                "pss_file_kb": total.pss_file_kb,
            }
            for metric, kb in (
                ("rss_per_container", total.rss_kb),
                ("pss_per_container", total.pss_kb),
                ("private_per_container", total.private_kb),
            ):
                ctx.record(name, metric, key, per_container_mb(kb, containers), "MB")
    finally:
        ctx.env.remove_containers(started)
    if misgrouped:
        raise ScenarioFailed(
            f"{', '.join(RUNTIMES[k] for k in misgrouped)} did not run one shim per pod"
        )


def _checkpoints(n: int) -> list[int]:
    marks = {1, n}
    for decade in (1, 10, 100, 1000):
        marks.update(m * decade for m in (1, 2, 5) if m * decade < n)
    return sorted(marks)


def run_scale(ctx: Context, log: Callable[[str], None]) -> None:
    """One series per ``--scale`` count, each its own results entry."""
    counts = ctx.cfg.scale_containers
    for index, n in enumerate(counts):
        name = scale_scenario_name(n, counts)
        body = ctx.scenario(name)
        body["containers"] = n
        body["loadavg_start"] = os.getloadavg()
        _run_scale_series(ctx, name, n, round_order(index, list(ctx.cfg.runtimes)), log)


def _run_scale_series(
    ctx: Context, name: str, n: int, order: list[str], log: Callable[[str], None]
) -> None:
    """N containers started one after another per runtime: time per start and the
    runtime's total shim memory as the count grows."""
    marks = _checkpoints(n)
    series = ctx.scenario(name).setdefault("series", {})
    for key in order:
        started: list[str] = []
        points: list[dict[str, float]] = []
        try:
            for i in range(1, n + 1):
                cid = ctx.new_id("scale", key)
                started.append(cid)
                ms = ctx.start_idle(key, cid)
                ctx.record(name, "start_each", key, ms, "ms")
                if i in marks:
                    # Including the template's PSS: per-container figures must carry it.
                    total = _total_memory(ctx.shims_of(key) + ctx.helpers_of(key))
                    points.append(
                        {
                            "containers": i,
                            "start_ms": ms,
                            "rss_kb": total.rss_kb,
                            "pss_kb": total.pss_kb,
                            "private_kb": total.private_kb,
                        }
                    )
            last = points[-1]
            ctx.record(name, "pss_per_container", key, per_container_mb(last["pss_kb"], n), "MB")
            ctx.record(name, "total_pss", key, last["pss_kb"] / 1024, "MB")
            if ctx.cfg.scale_ksm:
                shims = ctx.shims_of(key)
                # 1000 shims take ~45 min at the kernel's default scan rate.
                _settle_ksm(ctx, name, log, shims, timeout=3600.0)
                total = _total_memory(shims + ctx.helpers_of(key))
                metadata_kb = sum(ksm.read_process(pid).metadata_kb for pid in shims)
                ctx.record(
                    name, "pss_per_container_merged", key, per_container_mb(total.pss_kb, n), "MB"
                )
                ctx.record(
                    name, "ksm_metadata_per_container", key, per_container_mb(metadata_kb, n), "MB"
                )
        except Exception as exc:
            ctx.error(name, key, f"after {len(started)} containers: {exc}")
            log(f"  {name}/{key}: {exc}")
        finally:
            series[key] = points
            ctx.env.remove_containers(started)


def _settle_ksm(
    ctx: Context,
    name: str,
    log: Callable[[str], None],
    pids: Sequence[int],
    timeout: float = 600.0,
) -> None:
    """Where the node runs ksmd and some of ``pids`` have mergeable memory, memory is
    read once ksmd has merged what it can, as on a node running shims for longer than
    a bench does. (With nothing mergeable, ksmd does not scan: nothing to wait for.)"""
    if any(ksm.read_process(pid).mergeable for pid in pids):
        ctx.scenario(name)["ksm_wait_s"] = round(ksm.wait_for_merging(log, timeout), 1)


def _total_memory(pids: Sequence[int]) -> MemoryUsage:
    total = MemoryUsage(0, 0, 0)
    for pid in pids:
        try:
            total = total + read_memory(pid)
        except FileNotFoundError:
            continue
    return total


def run_restart(ctx: Context, log: Callable[[str], None]) -> None:
    """SIGKILL containerd with K containers running, restart it, and time until its
    socket answers and until ``ctr task ls`` shows all K RUNNING."""
    name = "restart"
    k = ctx.cfg.restart_containers
    for rnd in range(ctx.cfg.restart_rounds):
        for key in round_order(rnd, list(ctx.cfg.runtimes)):
            ids = [ctx.new_id("rst", key) for _ in range(k)]
            try:
                for cid in ids:
                    ctx.start_idle(key, cid)
                ctx.events.stop()
                ctx.env.kill9(start_again=False)
                t0 = time.perf_counter()
                ready = ctx.env.start()
                deadline = t0 + 60
                while True:
                    statuses = ctx.env.task_statuses()
                    if all(statuses.get(cid) == "RUNNING" for cid in ids):
                        break
                    if time.perf_counter() > deadline:
                        raise TimeoutError(f"not all RUNNING after 60 s: {statuses}")
                    time.sleep(0.01)
                t_all = time.perf_counter() - t0
                ctx.record(name, "socket_ready", key, ready * 1000, "ms")
                ctx.record(name, "all_running", key, t_all * 1000, "ms")
            except Exception as exc:
                ctx.error(name, key, f"round {rnd}: {exc}")
                log(f"  restart/{key} round {rnd}: {exc}")
            finally:
                if ctx.env.pid is None:
                    ctx.env.start()
                ctx.events.start()
                ctx.env.remove_containers(ids)


FLEET_SCENARIOS: dict[str, Callable[[Context, Callable[[str], None]], None]] = {
    "idle": run_idle,
    "pods": run_pods,
    "scale": run_scale,
    "restart": run_restart,
}


def result_names(name: str, cfg: BenchConfig) -> list[str]:
    """The results entries scenario ``name`` fills."""
    if name == "scale":
        return [scale_scenario_name(n, cfg.scale_containers) for n in cfg.scale_containers]
    return [name]


def run_scenario(ctx: Context, name: str, log: Callable[[str], None]) -> None:
    if name in LATENCY_SCENARIOS:
        run_latency(ctx, LATENCY_SCENARIOS[name](), log)
    else:
        FLEET_SCENARIOS[name](ctx, log)
