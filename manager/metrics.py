"""What `stats` and `top` show, from the shim's Stats (cgroup metrics) and Pids replies
plus /proc (network counters of the container's namespace, process details)."""

from __future__ import annotations

import pwd
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import any_pb2

from protocol.proto import anyutil
from protocol.proto.cgroups.v1 import metrics_pb2 as v1
from protocol.proto.cgroups.v2 import metrics_pb2 as v2

# cgroup v1 reports "no limit" as a page-rounded 2^63-1; anything this large is none.
NO_LIMIT = 1 << 62


@dataclass(frozen=True)
class Usage:
    cpu_ns: int = 0
    memory: int = 0
    memory_limit: int = 0
    pids: int = 0


def usage(stats: any_pb2.Any) -> Usage:
    """CPU, memory (page cache left out, as docker's figure) and pids from either
    cgroup version's Metrics."""
    if anyutil.is_type(stats, v2.Metrics):
        m2 = anyutil.unpack(stats, v2.Metrics)
        mem = m2.memory.usage - min(m2.memory.inactive_file, m2.memory.usage)
        limit = m2.memory.usage_limit
        return Usage(
            cpu_ns=m2.cpu.usage_usec * 1000,
            memory=mem,
            memory_limit=limit if limit < NO_LIMIT else 0,
            pids=m2.pids.current,
        )
    m1 = anyutil.unpack(stats, v1.Metrics)
    used = m1.memory.usage.usage
    mem = used - min(m1.memory.total_inactive_file, used)
    limit = m1.memory.usage.limit
    return Usage(
        cpu_ns=m1.cpu.usage.total,
        memory=mem,
        memory_limit=limit if limit < NO_LIMIT else 0,
        pids=m1.pids.current,
    )


def net_io(pid: int) -> tuple[int, int]:
    """(rx, tx) bytes of every interface but lo, as the process's namespace counts them."""
    try:
        lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    except OSError:
        return 0, 0
    rx = tx = 0
    for line in lines:
        name, _, figures = line.partition(":")
        if name.strip() == "lo":
            continue
        f = figures.split()
        if len(f) >= 9:
            rx += int(f[0])
            tx += int(f[8])
    return rx, tx


@dataclass(frozen=True)
class ProcessRow:
    pid: int
    ppid: int
    user: str
    command: str


def process_row(pid: int) -> ProcessRow | None:
    """ps-like details of a host pid; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    # comm may hold spaces and parentheses: the fields start after the last ')'.
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
    uid = next((int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("Uid:")), 0)
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    words = [w.decode(errors="replace") for w in argv.split(b"\0") if w]
    return ProcessRow(pid=pid, ppid=ppid, user=user, command=" ".join(words) or f"[{comm}]")
