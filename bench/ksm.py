"""Kernel same-page merging (KSM) as the bench sees it.

pyshim's template marks its memory mergeable (shim/sys/ksm.py `mark_mergeable`), so
where the node runs ksmd, the byte-identical pages that forked shims copy are folded
back together. The bench measures the machine as it is configured: it records the
KSM settings, waits for ksmd to finish merging before reading memory, and reports
what merging cost (ksmd's CPU) beside what it saved.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.procfs import parse_ppid, parse_stat_cpu_ticks

__all__ = [
    "KsmState",
    "ProcessKsm",
    "ksmd_cpu_ticks",
    "read_process",
    "read_state",
    "wait_for_merging",
]

SYSFS = Path("/sys/kernel/mm/ksm")
PROC = Path("/proc")
KTHREADD = 2
# ksmd merges a page once its checksum held from one full scan to the next; the scan
# under way when the wait begins is partial, so pages that were stable by then have
# been merged after three.
SCANS_TO_SETTLE = 3
# struct ksm_rmap_item on 64-bit: what ksmd keeps per scanned page, in slab memory
# that no process's PSS shows (the kernel's ksm_process_profit charges it).
RMAP_ITEM_BYTES = 64


@dataclass(frozen=True)
class KsmState:
    run: int  # 1: ksmd merges; 0: stopped; 2: stopped and everything unmerged
    pages_to_scan: int
    sleep_millisecs: int
    full_scans: int
    pages_sharing: int

    def settings(self) -> dict[str, int]:
        state = asdict(self)
        del state["full_scans"], state["pages_sharing"]
        return state


def read_state(root: Path = SYSFS) -> KsmState | None:
    """The node's KSM state, or None on a kernel without KSM."""
    names = ("run", "pages_to_scan", "sleep_millisecs", "full_scans", "pages_sharing")
    try:
        return KsmState(*(int((root / name).read_text()) for name in names))
    except (FileNotFoundError, ValueError):
        return None


@dataclass(frozen=True)
class ProcessKsm:
    merged_kb: int  # the process's memory on merged pages
    metadata_kb: int  # ksmd's bookkeeping for the process's scanned pages
    mergeable: bool = False  # has memory marked for merging

    @classmethod
    def parse(cls, ksm_stat: str) -> ProcessKsm:
        """From /proc/<pid>/ksm_stat."""
        fields = dict(line.split(maxsplit=1) for line in ksm_stat.splitlines() if " " in line)
        page_kb = os.sysconf("SC_PAGE_SIZE") // 1024
        return cls(
            merged_kb=int(fields.get("ksm_merging_pages", 0)) * page_kb,
            metadata_kb=int(fields.get("ksm_rmap_items", 0)) * RMAP_ITEM_BYTES // 1024,
            mergeable=fields.get("ksm_mergeable:", "").strip() == "yes",
        )


def read_process(pid: int, proc: Path = PROC) -> ProcessKsm:
    """What KSM does for ``pid`` (zeros on a kernel without KSM)."""
    try:
        return ProcessKsm.parse((proc / str(pid) / "ksm_stat").read_text())
    except FileNotFoundError:
        return ProcessKsm(0, 0)


def ksmd_cpu_ticks(proc: Path = PROC) -> int | None:
    """utime+stime of the ksmd kernel thread, or None when there is none."""
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if name == "ksmd" and parse_ppid(stat) == KTHREADD:
            return parse_stat_cpu_ticks(stat)
    return None


def wait_for_merging(
    log: Callable[[str], None],
    timeout: float = 600.0,
    root: Path = SYSFS,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Wait until ksmd has merged what is mergeable now; the seconds waited (0 when
    ksmd is not running). Gives up after ``timeout`` seconds and says so."""
    state = read_state(root)
    if state is None or state.run != 1:
        return 0.0
    target = state.full_scans + SCANS_TO_SETTLE
    t0 = time.monotonic()
    while True:
        now = read_state(root)
        if now is None or now.run != 1 or now.full_scans >= target:
            break
        if time.monotonic() - t0 > timeout:
            log(f"  ksmd not through {SCANS_TO_SETTLE} scans in {timeout:.0f} s; measuring now")
            break
        sleep(0.5)
    waited = time.monotonic() - t0
    log(f"  waited {waited:.0f} s for ksmd to merge ({SCANS_TO_SETTLE} full scans)")
    return waited
