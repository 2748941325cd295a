"""shim/sys/ksm.py: which mappings a daemon offers to same-page merging, and when."""

from __future__ import annotations

import ast
from pathlib import Path

from shim.sys import ksm
from tests.unit.shim.boot.test_prefork import _run_child

MAPS = b"""\
55d0c0a00000-55d0c0a2e000 r--p 00000000 08:01 1234 /usr/bin/python3.11
55d0c0e5c000-55d0c0e9e000 rw-p 0045c000 08:01 1234 /usr/bin/python3.11
55d0c1a00000-55d0c1c00000 rw-p 00000000 00:00 0          [heap]
7f1e2c000000-7f1e2c100000 rw-s 00000000 00:01 77         /dev/zero (deleted)
7f1e2d000000-7f1e2d021000 ---p 00000000 00:00 0
7f1e2e000000-7f1e2e100000 rw-p 00000000 00:00 0
7ffd1c000000-7ffd1c021000 rw-p 00000000 00:00 0          [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0  [vsyscall]
"""


def test_private_writable_keeps_private_writable_mappings_only() -> None:
    assert ksm.private_writable(MAPS) == [
        (0x55D0C0E5C000, 0x55D0C0E9E000),  # the interpreter's data segment
        (0x55D0C1A00000, 0x55D0C1C00000),
        (0x7F1E2E000000, 0x7F1E2E100000),
        (0x7FFD1C000000, 0x7FFD1C021000),
    ]
    assert ksm.private_writable(b"") == []


# Marks itself, then reports which of its private writable mappings carry the
# mergeable flag ("mg" in smaps' VmFlags) in itself, in a forked child, and in a
# program it executes (which must have none: containers are started that way).
MERGEABLE_CHILD = r"""
import ast, os, subprocess, sys
from shim.sys import ksm

def count(smaps):
    flagged = writable = 0
    for line in smaps.splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and fields[1][1] == "w":
            writable += 1
        elif line.startswith("VmFlags:") and " mg" in line:
            flagged += 1
    return flagged, writable

marked = ksm.mark_mergeable()
own = count(open("/proc/self/smaps").read())
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(w, repr(count(open("/proc/self/smaps").read())).encode())
    os._exit(0)
os.waitpid(pid, 0)
forked = ast.literal_eval(os.read(r, 100).decode())
executed = count(subprocess.run(["cat", "/proc/self/smaps"], capture_output=True, text=True).stdout)
print(repr((marked, own, forked, executed)))
"""


def test_mergeable_mark_is_inherited_by_fork_and_dropped_by_exec() -> None:
    out = _run_child(MERGEABLE_CHILD)
    marked, own, forked, executed = ast.literal_eval(out)
    if not Path("/sys/kernel/mm/ksm").exists():
        # A kernel without KSM refuses the advice: nothing marked, nothing changed.
        assert marked == 0 and own[0] == forked[0] == executed[0] == 0
        return
    assert marked > 1 << 20  # the heap, arenas, data segments
    assert own[0] >= 3, own
    assert forked[0] >= own[0] - 1, forked  # the same mappings, but for the stack's guard
    assert executed == (0, executed[1]) and executed[1] > 0, executed


# started() marks a daemon once, and only one that mark_after_start() flagged.
STARTED_CHILD = r"""
from shim.sys import ksm

def flagged():
    return sum(" mg" in line for line in open("/proc/self/smaps") if line.startswith("VmFlags:"))

ksm.started()
before = flagged()
ksm.mark_after_start()
ksm.started()
after = flagged()
ksm.started()
print(before, after, ksm._mark_pending)
"""


def test_started_marks_a_forked_daemon_once() -> None:
    out = _run_child(STARTED_CHILD)
    before, after, pending = out.split()
    assert before == "0" and pending == "False"
    assert int(after) >= 3 or not Path("/sys/kernel/mm/ksm").exists()
