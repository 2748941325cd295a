"""Cgroup discovery, Metrics from cgroup files (fake trees in tmp), the v2 OOM watch."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from google.protobuf.message import Message

from protocol.proto import anyutil
from protocol.proto.cgroups.v1 import metrics_pb2 as v1
from protocol.proto.cgroups.v2 import metrics_pb2 as v2
from protocol.proto.events import task_pb2 as events_pb2
from shim.task.stats import (
    U64_MAX,
    Cgroup,
    CgroupGoneError,
    collect,
    parse_mountinfo,
    resolve_cgroup,
)

if TYPE_CHECKING:
    from shim.task.oom import OomWatcher

HYBRID_MOUNTINFO = """\
25 30 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
31 25 0:29 / /sys/fs/cgroup/memory rw,nosuid shared:15 - cgroup cgroup rw,memory
32 25 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:16 - cgroup cgroup rw,cpu,cpuacct
33 25 0:31 /nested /sys/fs/cgroup/pids rw,nosuid shared:17 - cgroup cgroup rw,pids
34 25 0:32 / /mnt/with\\040space rw - cgroup cgroup rw,blkio
"""

HYBRID_PROC_CGROUP = """\
9:name=systemd:/ns/c1
8:pids:/nested/ns/c1
7:cpu,cpuacct:/ns/c1
6:memory:/ns/c1
5:blkio:/ns/c1
0::/
"""


def test_hybrid_host_resolves_every_v1_controller() -> None:
    cg = resolve_cgroup(HYBRID_PROC_CGROUP, parse_mountinfo(HYBRID_MOUNTINFO))
    assert cg is not None and not cg.unified
    assert cg.memory_dir == "/sys/fs/cgroup/memory/ns/c1"
    assert cg.dir("cpu") == cg.dir("cpuacct") == "/sys/fs/cgroup/cpu,cpuacct/ns/c1"
    # The mount's root is /nested: the path below it is what counts.
    assert cg.dir("pids") == "/sys/fs/cgroup/pids/ns/c1"
    assert cg.dir("blkio") == "/mnt/with space/ns/c1"
    assert cg.dir("systemd") == "/sys/fs/cgroup/systemd/ns/c1"
    assert cg.dir("hugetlb") is None


def test_unified_host_uses_the_0_line() -> None:
    mountinfo = "30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n"
    cg = resolve_cgroup("0::/system.slice/c1\n", parse_mountinfo(mountinfo))
    assert cg == Cgroup(unified=True, dirs={"": "/sys/fs/cgroup/system.slice/c1"})
    assert cg.memory_dir == cg.dir("cpu") == "/sys/fs/cgroup/system.slice/c1"


def test_unknown_hierarchy_gives_no_cgroup() -> None:
    assert resolve_cgroup("3:freezer:/x\n", parse_mountinfo(HYBRID_MOUNTINFO)) is None
    # A path outside the mount's root is not reachable through it.
    mountinfo = "30 1 0:26 /sub /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert resolve_cgroup("0::/other\n", parse_mountinfo(mountinfo)) is None


def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def unpack_v1(any_msg: Message) -> v1.Metrics:
    return anyutil.unpack(any_msg, v1.Metrics)  # type: ignore[arg-type]


def test_v1_metrics_from_files(tmp_path: Path) -> None:
    write_tree(
        tmp_path,
        {
            "memory/memory.stat": "cache 4096\nrss 8192\npgpgin 7\npgmajfault 2\n"
            "hierarchical_memsw_limit 9223372036854771712\ntotal_pgfault 11\nunknown_key 5\n",
            "memory/memory.usage_in_bytes": "303104\n",
            "memory/memory.limit_in_bytes": "67108864\n",
            "memory/memory.max_usage_in_bytes": "2256896\n",
            "memory/memory.failcnt": "3\n",
            "memory/memory.kmem.usage_in_bytes": "249856\n",
            "memory/memory.kmem.tcp.limit_in_bytes": "9223372036854771712\n",
            "memory/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
            "cpuacct/cpuacct.usage": "17379304\n",
            "cpuacct/cpuacct.usage_percpu": "14322584 3056720 \n",
            "cpuacct/cpuacct.stat": "user 3\nsystem 1\n",
            "cpu/cpu.stat": "nr_periods 10\nnr_throttled 4\nthrottled_time 999\n",
            "pids/pids.current": "5\n",
            "pids/pids.max": "max\n",
            "blkio/blkio.throttle.io_serviced": "8:0 Read 12\n8:0 Write 3\nTotal 15\n",
            "blkio/blkio.throttle.io_service_bytes": "8:0 Read 4096\n",
            "hugetlb/hugetlb.2MB.usage_in_bytes": "2097152\n",
            "hugetlb/hugetlb.2MB.max_usage_in_bytes": "4194304\n",
        },
    )
    dirs = {c: str(tmp_path / c) for c in ("memory", "cpuacct", "cpu", "pids", "blkio", "hugetlb")}
    got = unpack_v1(collect(Cgroup(unified=False, dirs=dirs)))
    mem = got.memory
    assert (mem.cache, mem.rss, mem.pg_pg_in, mem.pg_maj_fault, mem.total_pg_fault) == (
        4096,
        8192,
        7,
        2,
        11,
    )
    assert mem.hierarchical_swap_limit == 9223372036854771712
    assert (mem.usage.usage, mem.usage.limit, mem.usage.max, mem.usage.failcnt) == (
        303104,
        67108864,
        2256896,
        3,
    )
    assert mem.kernel.usage == 249856
    assert mem.kernel_tcp.limit == 9223372036854771712
    # No memsw files (swap accounting off): the entry stays empty.
    assert not got.memory.HasField("swap")
    assert got.memory_oom_control.oom_kill == 2
    cpu = got.cpu
    assert (cpu.usage.total, list(cpu.usage.per_cpu)) == (17379304, [14322584, 3056720])
    tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    assert (cpu.usage.user, cpu.usage.kernel) == (3 * tick_ns, 1 * tick_ns)
    assert (cpu.throttling.periods, cpu.throttling.throttled_periods) == (10, 4)
    assert cpu.throttling.throttled_time == 999
    # "max" pids is reported as 0, as containerd does.
    assert (got.pids.current, got.pids.limit) == (5, 0)
    serviced = [(e.major, e.minor, e.op, e.value) for e in got.blkio.io_serviced_recursive]
    assert serviced == [(8, 0, "Read", 12), (8, 0, "Write", 3)]
    assert [e.value for e in got.blkio.io_service_bytes_recursive] == [4096]
    assert [(h.pagesize, h.usage, h.max) for h in got.hugetlb] == [("2MB", 2097152, 4194304)]


def test_v1_missing_controllers_and_files_are_skipped(tmp_path: Path) -> None:
    write_tree(tmp_path, {"memory/memory.usage_in_bytes": "10\n"})
    got = unpack_v1(
        collect(
            Cgroup(
                unified=False,
                dirs={"memory": str(tmp_path / "memory"), "pids": str(tmp_path / "gone")},
            )
        )
    )
    assert got.memory.usage.usage == 10
    assert not got.HasField("pids") and not got.HasField("cpu")


def test_v1_pids_limit_number(tmp_path: Path) -> None:
    write_tree(tmp_path, {"pids/pids.current": "2\n", "pids/pids.max": "64\n"})
    got = unpack_v1(collect(Cgroup(unified=False, dirs={"pids": str(tmp_path / "pids")})))
    assert (got.pids.current, got.pids.limit) == (2, 64)


def test_gone_cgroup_raises(tmp_path: Path) -> None:
    with pytest.raises(CgroupGoneError):
        collect(Cgroup(unified=False, dirs={"memory": str(tmp_path / "nope")}))
    with pytest.raises(CgroupGoneError):
        collect(Cgroup(unified=True, dirs={"": str(tmp_path / "nope")}))


def test_v2_metrics_from_files(tmp_path: Path) -> None:
    write_tree(
        tmp_path,
        {
            "pids.current": "3\n",
            "pids.max": "100\n",
            "cpu.stat": "usage_usec 500\nuser_usec 300\nsystem_usec 200\nnr_periods 1\n"
            "nr_throttled 0\nthrottled_usec 0\nnr_bursts 2\n",
            "memory.stat": "anon 4096\nfile 8192\npgfault 77\nworkingset_refault_anon 1\n",
            "memory.current": "12288\n",
            "memory.max": "max\n",
            "memory.swap.current": "0\n",
            "memory.swap.max": "0\n",
            "memory.peak": "65536\n",
            "memory.events": "low 0\nhigh 0\nmax 9\noom 2\noom_kill 1\n",
            "io.stat": "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n",
            "hugetlb.1GB.current": "0\n",
            "hugetlb.1GB.max": "max\n",
            "hugetlb.1GB.events": "max 4\n",
        },
    )
    got = anyutil.unpack(collect(Cgroup(unified=True, dirs={"": str(tmp_path)})), v2.Metrics)
    assert (got.pids.current, got.pids.limit) == (3, 100)
    assert (got.cpu.usage_usec, got.cpu.user_usec, got.cpu.system_usec) == (500, 300, 200)
    assert got.cpu.nr_bursts == 2
    mem = got.memory
    assert (mem.anon, mem.file, mem.pgfault, mem.usage) == (4096, 8192, 77, 12288)
    assert (mem.usage_limit, mem.swap_limit, mem.max_usage) == (U64_MAX, 0, 65536)
    assert (got.memory_events.max, got.memory_events.oom, got.memory_events.oom_kill) == (9, 2, 1)
    io = [(e.major, e.minor, e.rbytes, e.wbytes, e.rios, e.wios) for e in got.io.usage]
    assert io == [(8, 0, 4096, 8192, 1, 2)]
    assert [(h.pagesize, h.max, h.failcnt) for h in got.hugetlb] == [("1GB", U64_MAX, 4)]


def test_v2_unlimited_pids_and_empty_sections(tmp_path: Path) -> None:
    # As containerd's v2 code: "max" pids is 2^64-1, and io and rdma are sent even
    # when empty.
    write_tree(tmp_path, {"pids.current": "1\n", "pids.max": "max\n"})
    got = anyutil.unpack(collect(Cgroup(unified=True, dirs={"": str(tmp_path)})), v2.Metrics)
    assert (got.pids.current, got.pids.limit) == (1, U64_MAX)
    assert got.HasField("io") and got.HasField("rdma")
    assert not got.io.usage and not got.rdma.current and not got.rdma.limit


def test_v2_pressure_stall_figures(tmp_path: Path) -> None:
    write_tree(
        tmp_path,
        {
            "pids.current": "1\n",
            "cpu.stat": "usage_usec 5\n",
            "cpu.pressure": "some avg10=0.54 avg60=0.09 avg300=0.02 total=82017\n"
            "full avg10=0.18 avg60=0.03 avg300=0.00 total=39183\n",
            "memory.stat": "anon 1\n",
            "io.pressure": "some avg10=1.00 avg60=0.00 avg300=0.00 total=7\n",
        },
    )
    got = anyutil.unpack(collect(Cgroup(unified=True, dirs={"": str(tmp_path)})), v2.Metrics)
    some, full = got.cpu.psi.some, got.cpu.psi.full
    assert (some.avg10, some.avg60, some.avg300, some.total) == (0.54, 0.09, 0.02, 82017)
    assert (full.avg10, full.total) == (0.18, 39183)
    assert got.io.psi.some.total == 7 and not got.io.psi.HasField("full")
    # No pressure file (a kernel without PSI): no psi section, as containerd.
    assert not got.memory.HasField("psi")


class Events:
    def __init__(self) -> None:
        self.published: list[tuple[str, Message]] = []
        self.changed = asyncio.Event()

    def publish(self, topic: str, event: Message) -> None:
        self.published.append((topic, event))
        self.changed.set()


@contextlib.contextmanager
def _watching(tmp_path: Path, events: str) -> Iterator[tuple[Path, Events, OomWatcher]]:
    """An OomWatcher on a memory.events file under ``tmp_path`` that holds ``events``,
    watching it for "c1"; closed on the way out."""
    from shim.task.oom import OomWatcher

    events_file = tmp_path / "memory.events"
    events_file.write_text(events)
    sink = Events()
    watcher = OomWatcher(sink)
    try:
        watcher.watch("c1", Cgroup(unified=True, dirs={"": str(tmp_path)}))
        yield events_file, sink, watcher
    finally:
        watcher.close()


async def test_v2_oom_watch_publishes_on_oom_kill_increase(tmp_path: Path) -> None:
    with _watching(tmp_path, "low 0\nhigh 0\nmax 0\noom 0\noom_kill 1\n") as (
        events_file,
        sink,
        watcher,
    ):
        # A change that is not an OOM kill publishes nothing.
        events_file.write_text("low 0\nhigh 3\nmax 0\noom 0\noom_kill 1\n")
        await asyncio.sleep(0.1)
        assert sink.published == []
        events_file.write_text("low 0\nhigh 3\nmax 1\noom 1\noom_kill 2\n")
        await asyncio.wait_for(sink.changed.wait(), 5)
        assert sink.published == [("/tasks/oom", events_pb2.TaskOOM(container_id="c1"))]
        # After unwatch nothing more arrives.
        watcher.unwatch("c1")
        events_file.write_text("low 0\nhigh 3\nmax 1\noom 2\noom_kill 3\n")
        await asyncio.sleep(0.1)
        assert len(sink.published) == 1


async def test_v2_flush_sees_a_pending_kill_before_the_loop_does(tmp_path: Path) -> None:
    with _watching(tmp_path, "oom_kill 0\n") as (events_file, sink, watcher):
        events_file.write_text("oom_kill 1\n")
        watcher.flush("c1")
        assert [t for t, _ in sink.published] == ["/tasks/oom"]
        await asyncio.sleep(0.1)
        # The inotify event that follows is not a second OOM.
        assert len(sink.published) == 1


def _write_unnotified(path: Path, text: str) -> None:
    """Change the file in place without an inotify event (writes through a mapping
    raise none): a kill the kernel counted but never notified before the file went."""
    data = text.encode()
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), len(data)) as m:
        assert len(m) == len(data)
        m[:] = data


async def test_v2_a_kill_counted_after_the_oom_is_read_without_its_notification(
    tmp_path: Path,
) -> None:
    with _watching(tmp_path, "max 0\noom 0\noom_kill 0\n") as (events_file, sink, _):
        # The OOM killer was invoked (notified); its kill comes a little later, unnotified.
        events_file.write_text("max 1\noom 1\noom_kill 0\n")
        await asyncio.sleep(0.02)
        assert sink.published == []
        _write_unnotified(events_file, "max 1\noom 1\noom_kill 1\n")
        await asyncio.wait_for(sink.changed.wait(), 5)
        assert sink.published == [("/tasks/oom", events_pb2.TaskOOM(container_id="c1"))]
        await asyncio.sleep(0.3)
        assert len(sink.published) == 1


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from shim.task import oom

    reads: list[str] = []
    real = oom.read_memory_events

    def counting(path: str) -> tuple[int, int, int] | None:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(oom, "read_memory_events", counting)
    return reads


async def _until(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


async def test_v2_rereads_after_an_oom_are_bounded_and_end_with_the_watch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shim.task import oom

    reads = _count_reads(monkeypatch)
    with _watching(tmp_path, "oom 0\noom_kill 0\n") as (events_file, sink, watcher):
        # An OOM without a kill (no victim left to choose): one burst of rereads, then
        # nothing, however long the shim stays idle.
        events_file.write_text("oom 1\noom_kill 0\n")
        burst = 2 + len(oom.RECHECK_DELAYS)  # the watch's read, the notified one, the burst
        await _until("the burst", lambda: len(reads) >= burst)
        await asyncio.sleep(0.3)
        assert len(reads) == burst
        assert sink.published == []
        # A second OOM starts a new burst, which the end of the watch stops.
        events_file.write_text("oom 2\noom_kill 0\n")
        await _until("a second burst", lambda: len(reads) >= burst + 2)
        watcher.unwatch("c1")
        stopped = len(reads)
        await asyncio.sleep(0.3)
        assert len(reads) == stopped < 2 * burst - 1


async def test_v2_a_cgroup_held_at_its_limit_does_not_restart_the_burst(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shim.task import oom

    reads = _count_reads(monkeypatch)
    # The burst's last reread comes late, so the second limit hit falls inside it.
    monkeypatch.setattr(oom, "RECHECK_DELAYS", (0.001, 0.002, 1.0))
    with _watching(tmp_path, "max 0\noom 0\noom_kill 0\n") as (events_file, sink, _):
        events_file.write_text("max 1\noom 0\noom_kill 0\n")
        await _until("two rereads", lambda: len(reads) >= 4)  # watch, notified, 2 rereads
        events_file.write_text("max 2\noom 0\noom_kill 0\n")
        await _until("the notified read", lambda: len(reads) >= 5)
        await asyncio.sleep(0.2)
        assert len(reads) == 5  # no new burst: its 1 and 2 ms rereads would show here
        await _until("the burst's last reread", lambda: len(reads) >= 6)
        await asyncio.sleep(0.3)
        assert len(reads) == 6
        assert sink.published == []


async def test_watch_without_memory_controller_is_a_no_op(tmp_path: Path) -> None:
    from shim.task.oom import OomWatcher

    sink = Events()
    watcher = OomWatcher(sink)
    watcher.watch("c1", Cgroup(unified=False, dirs={"cpu": str(tmp_path)}))
    # A v1 memory dir without the cgroup interface files: logged, not raised.
    watcher.watch("c2", Cgroup(unified=False, dirs={"memory": str(tmp_path)}))
    watcher.flush("c1")
    watcher.flush("c2")
    watcher.close()
    assert sink.published == []
