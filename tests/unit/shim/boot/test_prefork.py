"""shim/boot/prefork.py: fresh code objects for our packages' functions, old ones kept;
immortal template objects on CPython >= 3.12."""

from __future__ import annotations

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


def test_compact_hot_replaces_the_named_functions_in_the_lists_order() -> None:
    mod = types.ModuleType("pfhot")
    exec(compile(SOURCE, "pfhot.py", "exec"), mod.__dict__)
    outer, method, static = mod.outer, mod.K.method, mod.K.__dict__["static"].__func__
    before = (outer.__code__, method.__code__, static.__code__, mod.K.prop.fget.__code__)
    names = ["pfhot:K.static", "pfhot:nothing", "pfgone:f", "pfhot:outer", "pfhot:K.method"]
    sys.modules["pfhot"] = mod
    try:
        assert prefork.compact_hot(names) == 3
    finally:
        del sys.modules["pfhot"]
    assert outer.__code__ is not before[0] and outer.__code__.co_code == before[0].co_code
    assert method.__code__ is not before[1] and static.__code__ is not before[2]
    assert mod.K.prop.fget.__code__ is before[3]  # not named: left as it was
    # Re-created (so allocated) in the list's order.
    retired = [id(c) for c in prefork._retired]
    assert (
        retired.index(id(before[2])) < retired.index(id(before[0])) < retired.index(id(before[1]))
    )
    assert (mod.outer(2), mod.K().method(), mod.K.static()) == (3, "m", "s")


def test_hot_list_names_what_a_daemons_start_up_runs() -> None:
    # shim/boot/hotcode.py is made from traced daemons (bench/cow.py trace_code): a
    # daemon's start-up (the spare's rehearsal) must still run mostly what it names,
    # or it is stale and should be made again.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from shim.boot import template, hotcode\n"
        "from bench.cow import code_names\n"
        "template.preload()\n"
        "names = code_names()\n"
        "called = set()\n"
        "sys.setprofile(lambda fr, ev, a: called.add(fr.f_code) if ev == 'call' else None)\n"
        "from shim import daemon; daemon.rehearse()\n"
        "sys.setprofile(None)\n"
        "ran = {names[c] for c in called if c in names}\n"
        "listed = set(hotcode.FUNCTIONS)\n"
        "print(len(ran), len(ran & listed), sorted(ran - listed))\n"
    )
    repo = str(Path(prefork.__file__).resolve().parents[2])
    res = subprocess.run(
        [sys.executable, "-I", "-c", code, repo], capture_output=True, text=True, check=True
    )
    ran, listed, missing = res.stdout.split(" ", 2)
    assert int(ran) > 50
    assert int(listed) >= 0.9 * int(ran), missing


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


# Run by an interpreter >= 3.12 (immortal objects, so reading a class writes nothing
# but what the attribute cache writes): the first lookup on a class writes its version
# tag into the class object, in every forked child, unless the template assigned it.
TYPE_VERSION_CHILD = r"""
import gc, os
from shim.boot import prefork

def private_dirty_kb():
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Private_Dirty"))

def touched_in_child(classes):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        before = private_dirty_kb()
        for cls in classes:
            getattr(cls, "absent", None)
        os.write(w, str(private_dirty_kb() - before).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    return int(os.read(r, 64))

classes = [type(f"K{i}", (), {"x": i}) for i in range(4000)]  # ~1 KB each
gc.collect()
prefork.immortalize()
gc.freeze()
untagged_kb = touched_in_child(classes)
gc.unfreeze()  # the template assigns them before its freeze
assert prefork.assign_type_versions() >= 4000
gc.freeze()
tagged_kb = touched_in_child(classes)
print(untagged_kb, tagged_kb)
"""


def test_type_versions_assigned_before_the_fork_keep_classes_shared() -> None:
    python = _python_312_or_later()
    if python is None:
        pytest.skip("no CPython >= 3.12 on this host (reading a class writes its refcount)")
    untagged_kb, tagged_kb = map(int, _run_child(TYPE_VERSION_CHILD, python).split())
    # 4000 classes of ~1 KB: a lookup on each copies ~4 MB unless the tags are there.
    assert untagged_kb > 2000, (untagged_kb, tagged_kb)
    assert tagged_kb < untagged_kb / 4, (untagged_kb, tagged_kb)


def test_type_versions_do_not_run_metaclass_getattr() -> None:
    calls: list[str] = []

    class Meta(type):
        def __getattr__(cls, name: str) -> object:
            calls.append(name)
            raise AttributeError(name)

    class Probed(metaclass=Meta):
        pass

    assert prefork.assign_type_versions() > 0
    assert calls == []
    assert Probed.__name__ == "Probed"


def test_release_free_heap_returns_freed_pages() -> None:
    # Several MB freed at the top of the C heap are given back to the kernel.
    script = r"""
import ctypes
from shim.boot import prefork

def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))

libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: keep the blocks on the heap
libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: free() itself does not trim
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(64 * 1024) for _ in range(160)]
for b in blocks:
    ctypes.memset(b, 1, 64 * 1024)
for b in blocks:
    libc.free(b)
before = rss_kb()
released = prefork.release_free_heap()
print(int(released), before - rss_kb())
"""
    released, freed_kb = map(int, _run_child(script).split())
    assert released == 1
    assert freed_kb > 5000, freed_kb
