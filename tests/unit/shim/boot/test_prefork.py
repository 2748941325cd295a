"""shim/prefork.py: fresh code objects for our packages' functions, old ones kept;
immortal template objects on CPython >= 3.12."""

from __future__ import annotations

import ast
import glob
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from shim.boot import prefork

SOURCE = """
def outer(x):
    def inner(y):
        return x + y
    return inner(1)

class K:
    def method(self):
        return "m"

    @staticmethod
    def static():
        return "s"

    @property
    def prop(self):
        return "p"
"""


def test_compact_code_replaces_code_of_package_functions() -> None:
    mod = types.ModuleType("pfpkg.mod")
    exec(compile(SOURCE, "pfpkg/mod.py", "exec"), mod.__dict__)
    mod.__dict__["foreign"] = len  # not a function defined here: left alone
    before = {
        "outer": mod.outer.__code__,
        "method": mod.K.method.__code__,
        "static": mod.K.__dict__["static"].__func__.__code__,
        "prop": mod.K.prop.fget.__code__,
    }
    sys.modules["pfpkg.mod"] = mod
    try:
        assert prefork.compact_code(("pfpkg",)) == 4
    finally:
        del sys.modules["pfpkg.mod"]
    after = {
        "outer": mod.outer.__code__,
        "method": mod.K.method.__code__,
        "static": mod.K.__dict__["static"].__func__.__code__,
        "prop": mod.K.prop.fget.__code__,
    }
    for name, code in before.items():
        assert after[name] is not code, name
        assert after[name].co_code == code.co_code
        # Kept alive: freeing it would leave a hole the daemon fills.
        assert any(old is code for old in prefork._retired)
    nested = [c for c in after["outer"].co_consts if isinstance(c, types.CodeType)]
    old_nested = [c for c in before["outer"].co_consts if isinstance(c, types.CodeType)]
    assert nested and nested[0] is not old_nested[0]
    assert (mod.outer(2), mod.K().method(), mod.K.static(), mod.K().prop) == (3, "m", "s", "p")


def _python_312_or_later() -> str | None:
    """An interpreter that can make objects immortal: this one, or another on the host."""
    if sys.version_info >= (3, 12):
        return sys.executable
    names = [f"python3.{minor}" for minor in range(20, 11, -1)]
    found = [shutil.which(name) for name in names]
    found += sorted(glob.glob("/root/.pyenv/versions/3.1[2-9]*/bin/python3"), reverse=True)
    # pyenv's shims only dispatch to the version selected for the directory.
    return next((path for path in found if path and "/shims/" not in path), None)


def _run_child(script: str, python: str = sys.executable) -> str:
    """stdout of ``script`` run by ``python -I`` with this tree importable (a process
    of its own: what these tests change is process-wide)."""
    root = Path(__file__).resolve().parents[4]
    res = subprocess.run(
        [python, "-I", "-c", f"import sys; sys.path.insert(0, {str(root)!r})\n" + script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


# Run by an interpreter >= 3.12: a forked child that reads every object of a large
# frozen list must not un-share the pages they lie on once they are immortal.
IMMORTAL_CHILD = r"""
import gc, os, sys
from shim.boot import prefork

def private_dirty_kb():
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Private_Dirty"))

def touched_in_child(objects):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        before = private_dirty_kb()
        for obj in objects:  # each iteration increfs and decrefs obj
            pass
        os.write(w, str(private_dirty_kb() - before).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    return int(os.read(r, 64))

data = [str(i) * 3 for i in range(200_000)]  # ~12 MB of distinct str objects
gc.collect()
gc.freeze()
mortal_kb = touched_in_child(data)
changed = prefork.immortalize()
assert changed >= 200_000, changed
immortal_kb = touched_in_child(data)
probe = data[12345]
count = sys.getrefcount(probe)
extra = [probe] * 10
assert sys.getrefcount(probe) == count, "incref wrote an immortal object"
fresh = object()
base = sys.getrefcount(fresh)
more = [fresh]
assert sys.getrefcount(fresh) == base + 1, "an object made later became immortal"
print(mortal_kb, immortal_kb)
"""


def test_immortal_mark_is_none_s_refcount_from_312() -> None:
    if sys.version_info >= (3, 12):
        assert prefork._immortal_refcount() == sys.getrefcount(None)
    else:
        assert prefork._immortal_refcount() is None
        assert prefork.immortalize() == 0


def test_immortalized_objects_stay_shared_with_forked_children() -> None:
    python = _python_312_or_later()
    if python is None:
        pytest.skip("no CPython >= 3.12 on this host (immortal objects need one)")
    mortal_kb, immortal_kb = map(int, _run_child(IMMORTAL_CHILD, python).split())
    # Reading 200k mortal objects copies every page they lie on (~12 MB); once immortal,
    # the child copies only its own stack and allocator bookkeeping.
    assert mortal_kb > 8000, (mortal_kb, immortal_kb)
    assert immortal_kb < mortal_kb / 10, (mortal_kb, immortal_kb)


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
    assert prefork.private_writable(MAPS) == [
        (0x55D0C0E5C000, 0x55D0C0E9E000),  # the interpreter's data segment
        (0x55D0C1A00000, 0x55D0C1C00000),
        (0x7F1E2E000000, 0x7F1E2E100000),
        (0x7FFD1C000000, 0x7FFD1C021000),
    ]
    assert prefork.private_writable(b"") == []


# Marks itself, then reports which of its private writable mappings carry the
# mergeable flag ("mg" in smaps' VmFlags) in itself, in a forked child, and in a
# program it executes (which must have none: containers are started that way).
MERGEABLE_CHILD = r"""
import ast, os, subprocess, sys
from shim.boot import prefork

def count(smaps):
    flagged = writable = 0
    for line in smaps.splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and fields[1][1] == "w":
            writable += 1
        elif line.startswith("VmFlags:") and " mg" in line:
            flagged += 1
    return flagged, writable

marked = prefork.mark_mergeable()
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
from shim.boot import prefork

def flagged():
    return sum(" mg" in line for line in open("/proc/self/smaps") if line.startswith("VmFlags:"))

prefork.started()
before = flagged()
prefork.mark_after_start()
prefork.started()
after = flagged()
prefork.started()
print(before, after, prefork._mark_pending)
"""


def test_started_marks_a_forked_daemon_once() -> None:
    out = _run_child(STARTED_CHILD)
    before, after, pending = out.split()
    assert before == "0" and pending == "False"
    assert int(after) >= 3 or not Path("/sys/kernel/mm/ksm").exists()
