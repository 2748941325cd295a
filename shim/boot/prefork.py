"""Work the shim template does just before `gc.freeze()`, so forked daemons share it.

A forked daemon un-shares every template page it writes. bench/cow.py's diff mode
shows which writes those are; in 3.11 the largest avoidable share is code objects:
every call of a function writes its code object (the warm-up counter, then the
quickened bytecode and inline caches), and the ~450 functions a daemon runs up to
its first Start are spread thinly over the template's heap, between objects nobody
touches, so each costs a page or more.

`prepare()` re-creates the code objects of our own packages (`shim`, `protocol`:
more than half of what a daemon runs) in one batch, so they lie next to each other
and the daemon's calls dirty a few dense pages instead of hundreds of sparse
ones. The old code objects are kept alive: freeing them would leave holes that the
daemon's allocations fill, each dirtying a page again. The ~230 functions outside
our packages that every daemon runs (asyncio's, logging's, enum's...: the list in
shim.boot.hotcode, made by bench/cow.py from traced daemons) get the same, right
after ours and in the order a daemon first calls them; not the rest of the standard
library, whose code objects a daemon never runs (doing all of them was worse).

It also builds what the daemon's hand-over would otherwise build in every child
(the prctl_mm_map ctypes structure), so that it is shared.

Two more writes every daemon would make to shared pages are made once, here:
`assign_type_versions()` gives every class the version tag the interpreter's
attribute cache keys on, which the first attribute lookup on a class otherwise writes
into the class object (~1 KB each, so about one page per class a daemon uses, in
every daemon); `release_free_heap()` returns the C heap's free pages (the template's
import and immortalisation temporaries) to the kernel, so the template does not keep
as its own the memory its daemons allocate into afresh.

What cannot be avoided can still be shared again: daemons forked from one template run
the same code from the same state, so the pages they copy are mostly byte-identical
from one daemon to the next. Where the operator asked for it (`PYSHIM_KSM=1` in the
shim's environment; merged pages open a timing side channel between every process
that marks memory, so never by default), a forked daemon offers its memory to the
kernel's same-page merging (KSM) once its first container has started
(shim.sys.ksm), so that where the node runs ksmd, identical copies are folded back
into one page. The template itself is not offered: ksmd scans at a fixed rate
whenever any memory is, so a node with a template but no shims would pay for nothing.
"""

from __future__ import annotations

import ctypes
import sys
import types

TYPE_CHECKING = False  # the template imports this module; mypy honours this name
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = [
    "PACKAGES",
    "assign_type_versions",
    "compact_code",
    "compact_hot",
    "functions_of",
    "immortalize",
    "prepare",
    "release_free_heap",
]

PACKAGES = ("shim", "protocol")

# The replaced code objects, never freed (see the module docstring).
_retired: list[types.CodeType] = []


def _fresh(code: types.CodeType) -> types.CodeType:
    """A copy of ``code`` and of the code objects nested in it (inner functions)."""
    consts = tuple(_fresh(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    _retired.append(code)
    return code.replace(co_consts=consts)


def functions_of(namespace: dict[str, object], module: str) -> list[types.FunctionType]:
    """Functions defined in ``module``: module-level, and methods of its classes."""
    found: list[types.FunctionType] = []
    for value in namespace.values():
        if isinstance(value, type) and value.__module__ == module:
            for attr in vars(value).values():
                found += _unwrap(attr)
        else:
            found += _unwrap(value)
    return [f for f in found if f.__module__ == module]


def _unwrap(value: object) -> list[types.FunctionType]:
    if isinstance(value, types.FunctionType):
        return [value]
    if isinstance(value, staticmethod | classmethod):
        return _unwrap(value.__func__)
    if isinstance(value, property):
        accessors = (value.fget, value.fset, value.fdel)
        return [f for f in accessors if isinstance(f, types.FunctionType)]
    return []


def compact_code(packages: tuple[str, ...] = PACKAGES) -> int:
    """Give every function of ``packages`` a fresh code object, allocated together;
    the number replaced."""
    functions: list[types.FunctionType] = []
    for name, module in sorted(sys.modules.items()):
        if module is not None and name.partition(".")[0] in packages:
            functions += functions_of(vars(module), name)
    return _renew(functions)


def _renew(functions: Iterable[types.FunctionType]) -> int:
    """Fresh code objects for ``functions``, once each, in their order; how many."""
    seen: set[int] = set()
    for func in functions:
        if id(func) not in seen:
            seen.add(id(func))
            func.__code__ = _fresh(func.__code__)
    return len(seen)


def compact_hot(names: Sequence[str]) -> int:
    """Give the functions ``names`` lists (``module:qualname``) fresh code objects,
    allocated together in the list's order, after our packages'; the number replaced.
    A name this interpreter does not have (another version, a module not imported)
    is skipped."""
    ranks: dict[str, dict[str, int]] = {}
    for rank, name in enumerate(names):
        module_name, _, qualname = name.partition(":")
        ranks.setdefault(module_name, {}).setdefault(qualname, rank)
    found: list[tuple[int, types.FunctionType]] = []
    for module_name, qualnames in ranks.items():
        namespace = getattr(sys.modules.get(module_name), "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for func in functions_of(namespace, module_name):
            at = qualnames.get(func.__qualname__)
            if at is not None:
                found.append((at, func))
    found.sort(key=lambda item: item[0])
    return _renew(func for _, func in found)


def prepare() -> None:
    from shim.boot import hotcode
    from shim.sys import syscalls

    syscalls.prctl_mm_map()
    compact_code()
    compact_hot(hotcode.FUNCTIONS)


def _immortal_refcount() -> int | None:
    """The reference count that marks an object immortal in this interpreter (None's,
    since None is immortal from 3.12 on), or None where objects cannot be made so:
    before 3.12, and in free-threaded builds (split reference counts)."""
    import sysconfig

    if sys.version_info < (3, 12) or sysconfig.get_config_var("Py_GIL_DISABLED"):
        return None
    return sys.getrefcount(None)


def _is_immortal(refcnt: int) -> bool:
    # CPython 3.12+ on 64-bit: immortal when the low 32 bits read as a negative int32.
    return bool(refcnt & 0x80000000)


def immortalize() -> int:
    """Make every object reachable from the collector's lists immortal; the number
    changed.

    A daemon writes the reference count of every object it touches, so each object it
    reads un-shares the template page it lies on (bench/cow.py: about half of a forked
    daemon's private pages on 3.11). From CPython 3.12 on, incref and decref skip an
    object whose count carries the immortal mark, so the template's objects are given
    that mark just before the freeze: they then stay shared however often a daemon uses
    them. They are never freed, which costs nothing, since the template holds them all
    for its life anyway; nothing of ours relies on a pre-fork object being freed by
    reference count (sockets and files are closed explicitly).

    The object layout is checked on a probe object first; anything unexpected leaves
    every object as it was.
    """
    import gc

    value = _immortal_refcount()
    if value is None or not _is_immortal(value):
        return 0
    word = ctypes.c_ssize_t
    probe = object()
    cell = word.from_address(id(probe))
    if cell.value != sys.getrefcount(probe) - 1:
        return 0  # the refcount is not the object's first word (a debug build)
    cell.value = value
    extra = [probe, probe]
    if sys.getrefcount(probe) != value or len(extra) != 2:
        return 0
    changed = 0
    seen: set[int] = set()
    stack: list[object] = gc.get_objects()
    while stack:
        obj = stack.pop()
        address = id(obj)
        if address in seen:
            continue
        seen.add(address)
        cell = word.from_address(address)
        if not _is_immortal(cell.value):
            cell.value = value
            changed += 1
        stack.extend(gc.get_referents(obj))
    return changed


# Looked up on every class and found on none: a name no class defines.
_VERSION_PROBE = "__pyshim_type_version_probe__"


def assign_type_versions() -> int:
    """Give every class reachable from the collector's lists its attribute-cache
    version tag now; the number of classes looked up.

    CPython caches attribute lookups on classes by a per-class version tag, which it
    assigns on a class's first lookup (`_PyType_Lookup`), writing the class object
    (tp_version_tag and tp_flags). A lookup of a name the class lacks is enough. It
    goes through `type.__getattribute__` itself, so no metaclass's `__getattr__` runs.
    A class changed later drops its tag and gets a new one on its next lookup, as
    always: this only moves the first assignment into the template.
    """
    import gc

    looked_up = 0
    for obj in gc.get_objects():
        if isinstance(obj, type):
            try:
                type.__getattribute__(obj, _VERSION_PROBE)
            except AttributeError:
                pass
            except Exception:  # a descriptor of the metaclass may raise anything
                continue
            looked_up += 1
    return looked_up


def release_free_heap() -> bool:
    """Return the C heap's free pages to the kernel (glibc); whether any were.

    The template's last steps (the collection, immortalize()'s bookkeeping) free
    megabytes at the top of the heap. Kept, those pages stay the template's: a
    daemon that allocates there copies them first. Released, the template does not
    hold them and a daemon gets fresh zero pages.
    """
    from shim.sys import syscalls

    try:
        return syscalls.malloc_trim()
    except OSError:
        return False
