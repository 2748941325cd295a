"""The container's cgroup: where it is, and its figures as containerd's Metrics messages.

Finding the cgroup happens at every Create, so this module imports only the standard
library at load time; the generated Metrics modules are imported when Stats is called.
The files read and how they map onto the messages follow containerd's cgroups library
(io.md §7, types.md "cgroup metrics"): a missing file leaves its fields at zero, a
missing cgroup directory means the cgroup is gone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from google.protobuf.any_pb2 import Any as AnyMessage
    from google.protobuf.message import Message

    from protocol.proto.cgroups.v1 import metrics_pb2 as v1_pb2
    from protocol.proto.cgroups.v2 import metrics_pb2 as v2_pb2

__all__ = [
    "Cgroup",
    "CgroupGoneError",
    "CgroupMount",
    "collect",
    "find_cgroup",
    "parse_mountinfo",
    "resolve_cgroup",
]

PROC = "/proc"
U64_MAX = (1 << 64) - 1
# cpuacct.stat counts USER_HZ ticks; containerd reports nanoseconds.
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_NS_PER_TICK = 1_000_000_000 // _CLOCK_TICKS


class CgroupGoneError(Exception):
    """No directory of the container's cgroup exists any more."""


@dataclass(frozen=True)
class CgroupMount:
    """One cgroup filesystem mount: v1 (``controllers`` set) or the v2 hierarchy."""

    mountpoint: str
    root: str
    controllers: frozenset[str]
    unified: bool


@dataclass(frozen=True)
class Cgroup:
    """Directories of one container's cgroup.

    ``unified`` means a pure cgroup v2 host (v2 Metrics, memory.events for OOM);
    otherwise ``dirs`` maps each v1 controller to its directory. A hybrid host's
    controller-less v2 line is ignored: it holds no figures.
    """

    unified: bool
    dirs: Mapping[str, str]

    def dir(self, controller: str) -> str | None:
        return self.dirs.get("" if self.unified else controller)

    @property
    def memory_dir(self) -> str | None:
        return self.dir("memory")


def parse_mountinfo(text: str) -> list[CgroupMount]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        tail = right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype, super_options = tail[0], tail[2]
        root, mountpoint = _unescape(fields[3]), _unescape(fields[4])
        if fstype == "cgroup2":
            mounts.append(CgroupMount(mountpoint, root, frozenset(), unified=True))
        elif fstype == "cgroup":
            controllers = frozenset(super_options.split(",")) - {"rw", "ro"}
            mounts.append(CgroupMount(mountpoint, root, controllers, unified=False))
    return mounts


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _join(mount: CgroupMount, path: str) -> str | None:
    rel = os.path.relpath(path, mount.root)
    if rel == "..." or rel.startswith("../"):
        return None
    return os.path.normpath(os.path.join(mount.mountpoint, rel))


def resolve_cgroup(proc_cgroup: str, mounts: Iterable[CgroupMount]) -> Cgroup | None:
    """Map the lines of /proc/<pid>/cgroup onto the mounted hierarchies."""
    mounts = list(mounts)
    v1: dict[str, str] = {}
    v2_path: str | None = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier_id, names, path = parts
        if hier_id == "0" and not names:
            v2_path = path
            continue
        wanted = frozenset(names.split(","))
        for mount in mounts:
            if not mount.unified and wanted <= mount.controllers:
                directory = _join(mount, path)
                if directory is not None:
                    for name in wanted:
                        v1[name.removeprefix("name=")] = directory
                break
    if v1:
        return Cgroup(unified=False, dirs=v1)
    if v2_path is not None:
        for mount in mounts:
            if mount.unified:
                directory = _join(mount, v2_path)
                if directory is not None:
                    return Cgroup(unified=True, dirs={"": directory})
    return None


def find_cgroup(pid: int, *, proc: str = PROC) -> Cgroup | None:
    """The cgroup of ``pid``, None when it cannot be read (e.g. the process is gone)."""
    try:
        with open(f"{proc}/{pid}/cgroup") as f:
            proc_cgroup = f.read()
        with open(f"{proc}/self/mountinfo") as f:
            mountinfo = f.read()
    except OSError:
        return None
    return resolve_cgroup(proc_cgroup, parse_mountinfo(mountinfo))


# -- reading ------------------------------------------------------------------------------


def _read(directory: str, name: str) -> str | None:
    try:
        with open(os.path.join(directory, name)) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _uint(text: str) -> int:
    text = text.strip()
    if text == "max":
        return U64_MAX
    # A limit reset to "no limit" may read as -1 on some kernels.
    return max(int(text), 0)


def _read_uint(directory: str, name: str) -> int | None:
    text = _read(directory, name)
    if text is None or not text.strip():
        return None
    return _uint(text)


def _flat_keyed(text: str | None) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                values[parts[0]] = _uint(parts[1])
            except ValueError:
                continue
    return values


def _assign(message: Message, values: Mapping[str, int], rename: Mapping[str, str]) -> None:
    fields = message.DESCRIPTOR.fields_by_name
    for key, value in values.items():
        name = rename.get(key, key)
        if name in fields and fields[name].type == fields[name].TYPE_UINT64:
            setattr(message, name, value)


def collect(cgroup: Cgroup) -> AnyMessage:
    """The cgroup's figures packed as containerd expects them in StatsResponse.stats."""
    from protocol.proto import anyutil

    if not any(os.path.isdir(d) for d in cgroup.dirs.values()):
        raise CgroupGoneError
    if cgroup.unified:
        return anyutil.pack(_collect_v2(cgroup.dirs[""]))
    return anyutil.pack(_collect_v1(cgroup))


# -- cgroup v1 ----------------------------------------------------------------------------

_V1_MEMORY_RENAMES = {
    "pgpgin": "pg_pg_in",
    "pgpgout": "pg_pg_out",
    "pgfault": "pg_fault",
    "pgmajfault": "pg_maj_fault",
    "hierarchical_memsw_limit": "hierarchical_swap_limit",
    "total_pgpgin": "total_pg_pg_in",
    "total_pgpgout": "total_pg_pg_out",
    "total_pgfault": "total_pg_fault",
    "total_pgmajfault": "total_pg_maj_fault",
}
_V1_MEMORY_ENTRIES = (
    ("usage", ""),
    ("swap", "memsw."),
    ("kernel", "kmem."),
    ("kernel_tcp", "kmem.tcp."),
)
_V1_ENTRY_FILES = (
    ("usage", "usage_in_bytes"),
    ("limit", "limit_in_bytes"),
    ("max", "max_usage_in_bytes"),
    ("failcnt", "failcnt"),
)
# CFQ-style files first; containerd falls back to the throttle files when they are empty.
_V1_BLKIO_FILES = (
    ("sectors_recursive", "sectors_recursive"),
    ("io_service_bytes_recursive", "io_service_bytes_recursive"),
    ("io_serviced_recursive", "io_serviced_recursive"),
    ("io_queued_recursive", "io_queued_recursive"),
    ("io_service_time_recursive", "io_service_time_recursive"),
    ("io_wait_time_recursive", "io_wait_time_recursive"),
    ("io_merged_recursive", "io_merged_recursive"),
    ("io_time_recursive", "time_recursive"),
)
_V1_BLKIO_THROTTLE = (
    ("io_serviced_recursive", "throttle.io_serviced"),
    ("io_service_bytes_recursive", "throttle.io_service_bytes"),
)


def _collect_v1(cgroup: Cgroup) -> v1_pb2.Metrics:
    from protocol.proto.cgroups.v1 import metrics_pb2 as m

    metrics = m.Metrics()
    if (d := cgroup.dir("pids")) and os.path.isdir(d):
        current = _read_uint(d, "pids.current")
        limit = _read_uint(d, "pids.max")
        metrics.pids.current = current or 0
        # containerd reports an unlimited pids.max as 0.
        metrics.pids.limit = 0 if limit in (None, U64_MAX) else limit
    if (d := cgroup.dir("cpuacct")) and os.path.isdir(d):
        usage = metrics.cpu.usage
        usage.total = _read_uint(d, "cpuacct.usage") or 0
        percpu = _read(d, "cpuacct.usage_percpu")
        usage.per_cpu.extend(int(v) for v in (percpu or "").split())
        ticks = _flat_keyed(_read(d, "cpuacct.stat"))
        usage.user = ticks.get("user", 0) * _NS_PER_TICK
        usage.kernel = ticks.get("system", 0) * _NS_PER_TICK
    if (d := cgroup.dir("cpu")) and os.path.isdir(d):
        stat = _flat_keyed(_read(d, "cpu.stat"))
        metrics.cpu.throttling.periods = stat.get("nr_periods", 0)
        metrics.cpu.throttling.throttled_periods = stat.get("nr_throttled", 0)
        metrics.cpu.throttling.throttled_time = stat.get("throttled_time", 0)
    if (d := cgroup.dir("memory")) and os.path.isdir(d):
        _v1_memory(d, metrics)
    if (d := cgroup.dir("blkio")) and os.path.isdir(d):
        _v1_blkio(d, metrics.blkio)
    if (d := cgroup.dir("hugetlb")) and os.path.isdir(d):
        for pagesize in _hugetlb_sizes(d, suffix=".usage_in_bytes"):
            prefix = f"hugetlb.{pagesize}."
            metrics.hugetlb.add(
                pagesize=pagesize,
                usage=_read_uint(d, prefix + "usage_in_bytes") or 0,
                max=_read_uint(d, prefix + "max_usage_in_bytes") or 0,
                failcnt=_read_uint(d, prefix + "failcnt") or 0,
            )
    return metrics


def _v1_memory(d: str, metrics: v1_pb2.Metrics) -> None:
    memory = metrics.memory
    _assign(memory, _flat_keyed(_read(d, "memory.stat")), _V1_MEMORY_RENAMES)
    for entry_name, module in _V1_MEMORY_ENTRIES:
        entry = getattr(memory, entry_name)
        for field, suffix in _V1_ENTRY_FILES:
            value = _read_uint(d, f"memory.{module}{suffix}")
            if value is not None:
                setattr(entry, field, value)
    oom = _flat_keyed(_read(d, "memory.oom_control"))
    if oom:
        _assign(metrics.memory_oom_control, oom, {})


def _v1_blkio(d: str, blkio: v1_pb2.BlkIOStat) -> None:
    devices: dict[tuple[int, int], str] | None = None

    def read_entries(field: str, filename: str) -> int:
        nonlocal devices
        text = _read(d, "blkio." + filename)
        entries = getattr(blkio, field)
        count = 0
        for line in (text or "").splitlines():
            parts = line.split()
            if len(parts) not in (2, 3) or ":" not in parts[0]:
                continue  # "Total N"
            major, _, minor = parts[0].partition(":")
            if devices is None:
                devices = _block_devices()
            key = (int(major), int(minor))
            entries.add(
                major=key[0],
                minor=key[1],
                op=parts[1] if len(parts) == 3 else "",
                value=int(parts[-1]),
                device=devices.get(key, ""),
            )
            count += 1
        return count

    cfq = os.path.exists(os.path.join(d, "blkio.io_serviced_recursive"))
    if cfq and sum(read_entries(field, name) for field, name in _V1_BLKIO_FILES) > 0:
        return
    for field, name in _V1_BLKIO_THROTTLE:
        read_entries(field, name)


def _block_devices(proc: str = PROC) -> dict[tuple[int, int], str]:
    devices: dict[tuple[int, int], str] = {}
    text = _read(proc, "partitions") or ""
    for line in text.splitlines()[2:]:
        parts = line.split()
        if len(parts) == 4 and parts[0].isdigit() and parts[1].isdigit():
            devices[(int(parts[0]), int(parts[1]))] = "/dev/" + parts[3]
    return devices


def _hugetlb_sizes(d: str, *, suffix: str) -> list[str]:
    try:
        names = os.listdir(d)
    except OSError:
        return []
    sizes = []
    for name in names:
        if name.startswith("hugetlb.") and name.endswith(suffix):
            size = name[len("hugetlb.") : -len(suffix)]
            if "." not in size:
                sizes.append(size)
    return sorted(sizes)


# -- cgroup v2 ----------------------------------------------------------------------------


def _psi(text: str | None, psi: Message) -> None:
    # "some avg10=0.54 avg60=0.09 avg300=0.02 total=82017" (and a "full" line).
    for line in (text or "").splitlines():
        kind, *pairs = line.split()
        if kind not in ("some", "full"):
            continue
        data = getattr(psi, kind)
        for key, _, value in (p.partition("=") for p in pairs):
            try:
                setattr(data, key, int(value) if key == "total" else float(value))
            except (AttributeError, ValueError):
                continue


def _collect_v2(d: str) -> v2_pb2.Metrics:
    from protocol.proto.cgroups.v2 import metrics_pb2 as m

    metrics = m.Metrics()
    current = _read_uint(d, "pids.current")
    if current is not None:
        metrics.pids.current = current
        limit = _read_uint(d, "pids.max")
        # On cgroup v2 containerd reads "max" as 2^64-1 (its v1 code reports 0).
        metrics.pids.limit = 0 if limit is None else limit
    cpu = _flat_keyed(_read(d, "cpu.stat"))
    if cpu:
        _assign(metrics.cpu, cpu, {})
    stat = _read(d, "memory.stat")
    if stat is not None:
        _assign(metrics.memory, _flat_keyed(stat), {})
        for field, name in (
            ("usage", "memory.current"),
            ("usage_limit", "memory.max"),
            ("swap_usage", "memory.swap.current"),
            ("swap_limit", "memory.swap.max"),
            ("max_usage", "memory.peak"),
            ("swap_max_usage", "memory.swap.peak"),
        ):
            value = _read_uint(d, name)
            if value is not None:
                setattr(metrics.memory, field, value)
    events = _flat_keyed(_read(d, "memory.events"))
    if events:
        _assign(metrics.memory_events, events, {})
    # Pressure stall figures, where the kernel keeps them (CONFIG_PSI), as containerd's
    # cgroup v2 code reads them.
    for section, name in ((metrics.cpu, "cpu"), (metrics.memory, "memory"), (metrics.io, "io")):
        _psi(_read(d, name + ".pressure"), section.psi)
    # containerd always sends the io and rdma sections, empty or not (`ctr task
    # metrics` shows them as {}); the node's RDMA devices are not read here.
    metrics.io.SetInParent()
    metrics.rdma.SetInParent()
    for line in (_read(d, "io.stat") or "").splitlines():
        device, *pairs = line.split()
        major, _, minor = device.partition(":")
        if not (major.isdigit() and minor.isdigit()):
            continue
        values = {k: v for k, _, v in (p.partition("=") for p in pairs)}
        entry = metrics.io.usage.add(major=int(major), minor=int(minor))
        for field in ("rbytes", "wbytes", "rios", "wios"):
            if values.get(field, "").isdigit():
                setattr(entry, field, int(values[field]))
    for pagesize in _hugetlb_sizes(d, suffix=".current"):
        prefix = f"hugetlb.{pagesize}."
        events_text = _flat_keyed(_read(d, prefix + "events"))
        metrics.hugetlb.add(
            pagesize=pagesize,
            current=_read_uint(d, prefix + "current") or 0,
            max=_read_uint(d, prefix + "max") or 0,
            failcnt=events_text.get("max", 0),
        )
    return metrics
