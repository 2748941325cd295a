"""bench/ksm.py: KSM state, merged memory and ksmd's CPU from fake sysfs/proc trees."""

from __future__ import annotations

import os
from pathlib import Path

from bench import ksm


def _sysfs(root: Path, **values: int) -> Path:
    root.mkdir(exist_ok=True)
    defaults = {"run": 1, "pages_to_scan": 100, "sleep_millisecs": 20}
    defaults.update(full_scans=7, pages_sharing=0)
    for name, value in {**defaults, **values}.items():
        (root / name).write_text(f"{value}\n")
    return root


def _proc(root: Path, pid: int, comm: str, ppid: int, utime: int, stime: int) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    fields = ["S", str(ppid)] + ["0"] * 9 + [str(utime), str(stime)] + ["0"] * 30
    (d / "stat").write_text(f"{pid} ({comm}) {' '.join(fields)}\n")


def test_read_state_and_settings(tmp_path: Path) -> None:
    state = ksm.read_state(_sysfs(tmp_path / "ksm", run=1, pages_to_scan=250, full_scans=3))
    assert state == ksm.KsmState(1, 250, 20, 3, 0)
    assert state.settings() == {"run": 1, "pages_to_scan": 250, "sleep_millisecs": 20}
    assert ksm.read_state(tmp_path / "absent") is None


KSM_STAT = """\
ksm_rmap_items 4443
ksm_zero_pages 0
ksm_merging_pages 37
ksm_process_profit -132800
ksm_merge_any: no
ksm_mergeable: yes
"""


def test_read_process_reads_ksm_stat(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "ksm_stat").write_text(KSM_STAT)
    page_kb = os.sysconf("SC_PAGE_SIZE") // 1024
    found = ksm.read_process(42, tmp_path)
    assert found == ksm.ProcessKsm(37 * page_kb, 4443 * 64 // 1024, mergeable=True)
    assert not ksm.ProcessKsm.parse(KSM_STAT.replace("mergeable: yes", "mergeable: no")).mergeable
    # The kernel's own profit figure (read off a shim here, 4 KB pages) is merged
    # bytes minus that bookkeeping: the item size is the kernel's.
    assert 37 * 4096 - 4443 * ksm.RMAP_ITEM_BYTES == -132800
    assert ksm.read_process(43, tmp_path) == ksm.ProcessKsm(0, 0)  # gone, or no KSM


def test_ksmd_is_the_kernel_thread_of_that_name(tmp_path: Path) -> None:
    _proc(tmp_path, 10, "ksmd", 1, 500, 500)  # a user process named ksmd: not it
    _proc(tmp_path, 37, "ksmd", 2, 12, 30)
    _proc(tmp_path, 38, "kworker/0:1 (x)", 2, 1, 1)
    (tmp_path / "self").mkdir()
    assert ksm.ksmd_cpu_ticks(tmp_path) == 42
    assert ksm.ksmd_cpu_ticks(tmp_path / "38") is None


def test_wait_for_merging_waits_three_full_scans(tmp_path: Path) -> None:
    root = _sysfs(tmp_path / "ksm", full_scans=5)
    sleeps: list[float] = []

    def scan(seconds: float) -> None:
        sleeps.append(seconds)
        scans = int((root / "full_scans").read_text())
        (root / "full_scans").write_text(f"{scans + 1}\n")

    lines: list[str] = []
    waited = ksm.wait_for_merging(lines.append, root=root, sleep=scan)
    assert len(sleeps) == 3 and (root / "full_scans").read_text() == "8\n"
    assert waited >= 0 and "3 full scans" in lines[-1]


def test_wait_for_merging_returns_at_once_when_ksmd_is_stopped(tmp_path: Path) -> None:
    lines: list[str] = []
    root = _sysfs(tmp_path / "ksm", run=0)
    assert ksm.wait_for_merging(lines.append, root=root, sleep=lambda s: None) == 0.0
    assert ksm.wait_for_merging(lines.append, root=tmp_path / "none") == 0.0
    assert lines == []


def test_wait_for_merging_gives_up_after_its_timeout(tmp_path: Path) -> None:
    root = _sysfs(tmp_path / "ksm")
    lines: list[str] = []
    ksm.wait_for_merging(lines.append, timeout=0.05, root=root, sleep=lambda s: None)
    assert any("measuring now" in line for line in lines)
