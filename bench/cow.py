"""Which pages a forked shim un-shares from its template, and what lives on them.

A daemon forked from the template (shim/boot/template.py) starts with every page shared
copy-on-write; each page it writes to (a refcount, an inline cache, a free slot in a
pymalloc pool, a malloc chunk) becomes a private copy. This tool counts, per
mapping, the pages a shim holds privately and splits them into copies of template
pages (same address present in the template) and pages the template never had; with
an object dump of the template it says which Python objects sit on the copied pages.

    python -m bench.cow run [--containers 10] [--pod-size 1] [--idle 10] [--prepare] [--out FILE]
    python -m bench.cow snapshot PID --template TPID [--objects FILE]
    python -m bench.cow traces FIRST [LAST]
    python -m bench.cow copies FILE...
    python -m bench.cow hotcode FILE...

``--pod-size N`` groups the containers in pods of N (the CRI sandbox annotation: one
shim per pod) and measures each pod's shim after its first container ("started")
and after its last ("joined"): what the containers that join a shim add.
``--prepare bench.cow:trace_allocations`` (with ``COW_TRACE_DIR``) has every daemon
write a tracemalloc snapshot after each Start it serves; ``traces`` compares two.
``--prepare bench.cow:trace_copies`` (same variable) has every daemon say, after each
Start, how much private memory it gained while each of our functions ran (the first
run of a path is where its copies happen) and which modules it imported itself;
``copies`` averages those files. ``--prepare bench.cow:trace_code`` has every daemon
list the functions outside our packages it ran; ``hotcode`` turns those lists into
shim/boot/hotcode.py.

``run`` starts a private containerd, an instrumented template in its template dir
(dumps every object's address before ``gc.freeze()``; ``--prepare MODULE:FUNC``
calls an experiment's function first) and measures a shim at each phase: forked and
waiting for "go", serving without a container, right after ``ctr run -d``, and
after ``--idle`` seconds. Needs root (page frame numbers in /proc/<pid>/pagemap).
"""

from __future__ import annotations

import os
import sys
import types
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

TYPE_CHECKING = False  # the template imports this module: keep its top level light
if TYPE_CHECKING:
    from pathlib import Path

    from protocol.proto.task.v2 import shim_pb2

__all__ = [
    "ObjectRecord",
    "RegionCount",
    "SmapsMapping",
    "attribute",
    "classify_pages",
    "decode_pagemap",
    "dump_objects",
    "main",
    "parse_object_dump",
    "parse_smaps",
    "region_names",
]

PAGE = 4096
PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_EXCLUSIVE = 1 << 56
PFN_MASK = (1 << 55) - 1
# Object header words before id(obj) in 3.11: PyGC_Head for GC types, and the
# dict/values pointers of types with a managed __dict__ (sys.getsizeof counts both).
_TPFLAGS_MANAGED_DICT = 1 << 4
_TPFLAGS_HAVE_GC = 1 << 14
FREE = "(free or untracked)"
LAUNCHER = "containerd-shim-pyshim-v1"


# -- /proc parsing ---------------------------------------------------------------


@dataclass(frozen=True)
class SmapsMapping:
    start: int
    end: int
    perms: str
    inode: int
    path: str
    fields: dict[str, int] = field(default_factory=dict)
    offset: int = 0  # file offset of a file mapping

    @property
    def size(self) -> int:
        return self.end - self.start


def parse_smaps(text: str) -> list[SmapsMapping]:
    """/proc/<pid>/smaps: one mapping per header line, its ``Key: N kB`` fields after."""
    maps: list[SmapsMapping] = []
    for line in text.splitlines():
        head, sep, rest = line.partition(" ")
        if "-" in head and sep and not head.endswith(":"):
            lo, _, hi = head.partition("-")
            parts = rest.split(None, 4)
            if len(parts) < 4:
                raise ValueError(f"bad smaps header: {line!r}")
            maps.append(
                SmapsMapping(
                    start=int(lo, 16),
                    end=int(hi, 16),
                    perms=parts[0],
                    inode=int(parts[3]),
                    path=parts[4].strip() if len(parts) == 5 else "",
                    offset=int(parts[1], 16),
                )
            )
            continue
        key, colon, value = line.partition(":")
        words = value.split()
        if colon and maps and len(words) == 2 and words[1] == "kB":
            maps[-1].fields[key] = int(words[0])
    return maps


def region_names(maps: Sequence[SmapsMapping]) -> list[str]:
    """A readable name per mapping: file basename and perms, ``[heap]``, ``[anon]``."""
    names: list[str] = []
    for m in maps:
        if m.path.startswith("["):
            name = m.path
        elif m.path:
            name = f"{os.path.basename(m.path)} {m.perms}"
        else:
            # The kernel merges a library's .bss with pymalloc arenas and malloc's
            # mmaps next to it into one mapping: no finer name is reliable.
            name = f"[anon {m.perms}]"
        names.append(name)
    return names


def decode_pagemap(raw: bytes) -> array[int]:
    """/proc/<pid>/pagemap entries (native 64-bit words, one per page)."""
    if len(raw) % 8:
        raise ValueError("pagemap data is not a whole number of entries")
    entries = array("Q")
    entries.frombytes(raw)
    return entries


@dataclass
class RegionCount:
    """Pages of one mapping of a shim, compared with the template's at the same address."""

    name: str
    size_kb: int = 0
    present: int = 0
    private: int = 0  # mapped by this process only
    copied: int = 0  # private, and the template has a page here: a copy-on-write copy
    new: int = 0  # private, the template has nothing here
    shared_template: int = 0  # the very frame the template maps
    private_dirty_kb: int = 0  # smaps' figure, for cross-checking

    def add(self, other: RegionCount) -> None:
        self.size_kb += other.size_kb
        self.present += other.present
        self.private += other.private
        self.copied += other.copied
        self.new += other.new
        self.shared_template += other.shared_template
        self.private_dirty_kb += other.private_dirty_kb


def classify_pages(
    start: int, shim: Sequence[int], template: Sequence[int] | None, count: RegionCount
) -> list[int]:
    """Count shim pages (pagemap entries from ``start``) into ``count``; the addresses
    of the copied pages. ``template``: the template's entries for the same range."""
    copied: list[int] = []
    for i, entry in enumerate(shim):
        if not entry & PM_PRESENT:
            continue
        count.present += 1
        t = template[i] if template is not None else 0
        t_present = bool(t & PM_PRESENT)
        if t_present and (t & PFN_MASK) == (entry & PFN_MASK):
            count.shared_template += 1
        if entry & PM_EXCLUSIVE:
            count.private += 1
            if t_present or t & PM_SWAPPED:
                count.copied += 1
                copied.append(start + i * PAGE)
            else:
                count.new += 1
    return copied


def read_pagemap(pid: int, start: int, end: int) -> array[int]:
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // PAGE * 8)
        raw = f.read((end - start) // PAGE * 8)
    return decode_pagemap(raw)


def read_smaps(pid: int) -> list[SmapsMapping]:
    with open(f"/proc/{pid}/smaps") as f:
        return parse_smaps(f.read())


@dataclass
class Snapshot:
    pid: int
    regions: dict[str, RegionCount]
    copied_pages: list[int]
    pss_kb: int
    private_kb: int
    template_wrote: int = 0  # pages, see _probe

    def total(self) -> RegionCount:
        total = RegionCount("total")
        for r in self.regions.values():
            total.add(r)
        return total


def snapshot(pid: int, template_pid: int | None) -> Snapshot:
    maps = read_smaps(pid)
    tmaps = {(m.start, m.end): m for m in read_smaps(template_pid)} if template_pid else {}
    regions: dict[str, RegionCount] = {}
    copied: list[int] = []
    for name, m in zip(region_names(maps), maps, strict=True):
        if m.path == "[vsyscall]":
            continue
        count = regions.setdefault(name, RegionCount(name))
        count.size_kb += m.size // 1024
        count.private_dirty_kb += m.fields.get("Private_Dirty", 0)
        entries = read_pagemap(pid, m.start, m.end)
        template = None
        if template_pid and _overlaps(tmaps, m):
            # Mappings split or grow after the fork (brk, mprotect): compare by address.
            template = read_pagemap(template_pid, m.start, m.end)
            if len(template) < len(entries):
                template.extend([0] * (len(entries) - len(template)))
        copied += classify_pages(m.start, entries, template, count)
    pss = sum(m.fields.get("Pss", 0) for m in maps)
    private = sum(m.fields.get("Private_Dirty", 0) + m.fields.get("Private_Clean", 0) for m in maps)
    return Snapshot(pid, regions, copied, pss, private)


def frames(pid: int) -> dict[int, int]:
    """Page address -> frame number of every present page of a process."""
    out: dict[int, int] = {}
    for m in read_smaps(pid):
        if m.path == "[vsyscall]":
            continue
        for i, entry in enumerate(read_pagemap(pid, m.start, m.end)):
            if entry & PM_PRESENT:
                out[m.start + i * PAGE] = entry & PFN_MASK
    return out


def moved_frames(before: dict[int, int], after: dict[int, int]) -> int:
    """Pages present in both whose frame changed: copy-on-write broken by this process."""
    return sum(1 for addr, pfn in before.items() if after.get(addr, pfn) != pfn)


def _overlaps(tmaps: dict[tuple[int, int], SmapsMapping], m: SmapsMapping) -> bool:
    return any(lo < m.end and m.start < hi for lo, hi in tmaps)


# -- Python objects on pages -----------------------------------------------------


@dataclass(frozen=True)
class ObjectRecord:
    start: int  # first byte, GC header included
    size: int
    type: str
    where: str  # module or file of functions, code, classes, modules; else ""
    name: str = ""  # qualname of code/functions/classes, owner of a dict, a str's text
    pre: int = 0  # header bytes before id(obj): PyGC_Head, managed dict pointers


def parse_object_dump(lines: Iterable[str]) -> list[ObjectRecord]:
    """``start_hex<TAB>size<TAB>type<TAB>where[<TAB>name<TAB>pre]`` lines, as
    dump_objects writes them."""
    records: list[ObjectRecord] = []
    for line in lines:
        parts = line.rstrip("\n").split("\t")
        if len(parts) == 4:
            records.append(ObjectRecord(int(parts[0], 16), int(parts[1]), parts[2], parts[3]))
        elif len(parts) == 6:
            start, size, kind, where, name, pre = parts
            records.append(ObjectRecord(int(start, 16), int(size), kind, where, name, int(pre)))
        else:
            raise ValueError(f"bad object dump line: {line!r}")
    return records


def attribute(
    objects: Iterable[ObjectRecord], pages: Iterable[int], *, by: str = "type"
) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes per label on the given pages, and bytes per label overall.

    ``by``: "type", "where" (module/file of code), or "both". The bytes of the
    pages no dumped object covers are reported under FREE.
    """
    wanted = set(pages)
    on_pages: dict[str, int] = {}
    overall: dict[str, int] = {}
    covered: dict[int, int] = {}
    for obj in objects:
        label = _label(obj, by)
        overall[label] = overall.get(label, 0) + obj.size
        first = obj.start - obj.start % PAGE
        for page in range(first, obj.start + obj.size, PAGE):
            if page not in wanted:
                continue
            n = min(page + PAGE, obj.start + obj.size) - max(page, obj.start)
            on_pages[label] = on_pages.get(label, 0) + n
            covered[page] = covered.get(page, 0) + n
    free = sum(max(0, PAGE - covered.get(p, 0)) for p in wanted)
    if free:
        on_pages[FREE] = free
    return on_pages, overall


def _label(obj: ObjectRecord, by: str) -> str:
    if by == "type":
        return obj.type
    if by == "where":
        return obj.where or f"({obj.type})"
    return f"{obj.type} {obj.where}".rstrip()


def _where(obj: object) -> str:
    import types

    if isinstance(obj, types.FunctionType):
        return _short_file(obj.__code__.co_filename)
    if isinstance(obj, types.CodeType):
        return _short_file(obj.co_filename)
    if isinstance(obj, type):
        return str(obj.__dict__.get("__module__", ""))
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    return ""


def _short_file(path: str) -> str:
    """Package-relative: .../site-packages/google/protobuf/x.py -> google/protobuf/x.py."""
    for marker in ("site-packages/", "dist-packages/", "/python3.11/", "/work/main/"):
        _, found, tail = path.rpartition(marker)
        if found:
            return tail
    return path


def _object_span(obj: object) -> tuple[int, int, int]:
    """(first byte, size, header bytes before id(obj))."""
    import sys as _sys

    flags = type(obj).__flags__
    pre = (16 if flags & _TPFLAGS_HAVE_GC else 0) + (16 if flags & _TPFLAGS_MANAGED_DICT else 0)
    return id(obj) - pre, _sys.getsizeof(obj), pre


def _name(obj: object, owners: dict[int, str]) -> str:
    """What tells this object from others of its type; tab- and newline-free."""
    import types

    if isinstance(obj, types.CodeType):
        name = obj.co_qualname
    elif isinstance(obj, types.FunctionType | type):
        name = str(obj.__qualname__)
    elif isinstance(obj, types.ModuleType):
        name = obj.__name__
    elif type(obj) is str:
        name = repr(obj[:40])
    else:
        name = owners.get(id(obj), "")
    return name.replace("\t", " ").replace("\n", " ")


def _dict_owners() -> dict[int, str]:
    """id of a module's or class's namespace dict -> "module NAME" / "class QUALNAME"."""
    import gc

    owners: dict[int, str] = {}
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if type(namespace) is dict:
            owners[id(namespace)] = f"module {getattr(module, '__name__', '?')}"
    for obj in gc.get_objects():
        if isinstance(obj, type):
            for ref in gc.get_referents(obj):
                if type(ref) is dict and ref is not obj.__dict__:
                    label = f"class {obj.__module__}.{obj.__qualname__}"
                    owners.setdefault(id(ref), label)
    return owners


def _extra_blocks(obj: object) -> Iterator[tuple[int, int]]:
    """Separately allocated parts: a dict's keys table, a list's item array."""
    import ctypes

    if type(obj) is dict:
        keys = ctypes.c_void_p.from_address(id(obj) + 32).value
        if keys:
            log2_size, log2_index_bytes, kind = ctypes.string_at(keys + 8, 3)
            entry = 24 if kind == 0 else 16
            usable = ((1 << log2_size) << 1) // 3
            yield keys, 32 + (1 << log2_index_bytes) + entry * usable
    elif type(obj) is list:
        items = ctypes.c_void_p.from_address(id(obj) + 24).value
        allocated = ctypes.c_ssize_t.from_address(id(obj) + 32).value
        if items and allocated > 0:
            yield items, allocated * 8


def dump_objects(out: str) -> None:
    """Write every object reachable from the gc's lists (and code objects' parts,
    which the gc does not see) with its address range, in this process."""
    import gc
    import types

    owners = _dict_owners()
    seen: set[int] = set()
    stack: list[object] = gc.get_objects()
    # Our own bookkeeping is not the template's.
    seen.update((id(seen), id(stack), id(owners)))
    with open(out, "w") as f:
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            start, size, pre = _object_span(obj)
            kind = type(obj).__name__
            try:
                where = _where(obj)
                name = _name(obj, owners)
            except Exception:  # proxies and lazy objects may raise anything
                where = name = ""
            f.write(f"{start:x}\t{size}\t{kind}\t{where}\t{name}\t{pre}\n")
            for block, bsize in _extra_blocks(obj):
                if block not in seen:
                    seen.add(block)
                    f.write(f"{block:x}\t{bsize}\t{kind}-items\t{where}\t{name}\t0\n")
            stack.extend(gc.get_referents(obj))
            if type(obj) is types.CodeType:
                stack.extend((obj.co_consts, obj.co_names, obj.co_filename, obj.co_name))
                stack.extend((obj.co_qualname, obj.co_linetable, obj.co_exceptiontable))
                stack.extend(obj.co_varnames + obj.co_cellvars + obj.co_freevars)


# -- which words changed, and whose they are -------------------------------------

# 3.11 pymalloc: 16 KiB pools in 1 MiB arenas (radix tree build), a 48-byte header
# at each pool's start (ref count, free list head, links, size class).
POOL = 16 * 1024
POOL_HEADER = 48
WORD = 8
SHIM = "shim"
TEMPLATE = "template"
# Fields of 3.11 objects by offset from id(obj) (Include/cpython/*.h), the ones a
# forked process plausibly writes; others are reported as "+offset".
_CODE_FIELDS = {
    48: "co_flags/co_warmup",
    144: "co_weakreflist",
    152: "_co_code (co_code cache)",
    160: "_co_linearray",
    168: "_co_firsttraceable",
    176: "co_extra",
}
_CODE_ADAPTIVE = 184  # offsetof(PyCodeObject, co_code_adaptive) == basicsize
_TYPE_FIELDS = {
    264: "tp_dict",
    352: "tp_cache",
    360: "tp_subclasses",
    384: "tp_version_tag",
    872: "ht_cached_keys",
    896: "_spec_cache",
}
_FIELDS = {
    "dict": {16: "ma_used", 24: "ma_version_tag", 32: "ma_keys", 40: "ma_values"},
    "dict-items": {0: "dk_refcnt", 8: "dk_version", 16: "dk_usable", 24: "dk_nentries"},
    "function": {120: "func_version"},
    "str": {24: "hash", 32: "state (interned)"},
    "list": {16: "ob_size", 24: "ob_item", 32: "allocated"},
}


@dataclass(frozen=True)
class Write:
    """One 8-byte word that differs between a shim and its template."""

    addr: int
    old: int  # the template's value at the fork
    new: int  # the writer's value
    side: str  # SHIM or TEMPLATE (the template wrote it after the fork)
    region: str


class ObjectIndex:
    """Which dumped object (or libpython static symbol) holds an address."""

    def __init__(self, objects: Iterable[ObjectRecord]) -> None:
        self.objects = sorted(objects, key=lambda o: o.start)
        self.starts = [o.start for o in self.objects]
        # Objects can nest (a static symbol around the objects in it): the
        # innermost wins, found by looking back past a few enclosing ones.
        self.lookback = 8

    def find(self, addr: int) -> ObjectRecord | None:
        import bisect

        i = bisect.bisect_right(self.starts, addr) - 1
        for j in range(i, max(-1, i - self.lookback), -1):
            obj = self.objects[j]
            if obj.start <= addr < obj.start + obj.size:
                return obj
        return None


def changed_words(old: bytes, new: bytes) -> list[int]:
    """Offsets of the 8-byte words that differ between two equally long buffers."""
    if old == new:
        return []
    if len(old) != len(new) or len(old) % WORD:
        raise ValueError("buffers of different or unaligned lengths")
    a, b = array("Q"), array("Q")
    a.frombytes(old)
    b.frombytes(new)
    return [i * WORD for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]


def page_writes(
    addr: int, base: bytes | None, shim: bytes, template: bytes, region: str
) -> list[Write]:
    """The words of one copied page the shim wrote, and those the template wrote after
    the fork (``base``: the template's page at the fork; None: not known, then every
    difference is put down to the shim)."""
    writes: list[Write] = []
    if base is None:
        for off in changed_words(template, shim):
            writes.append(Write(addr + off, _word(template, off), _word(shim, off), SHIM, region))
        return writes
    for off in changed_words(base, shim):
        writes.append(Write(addr + off, _word(base, off), _word(shim, off), SHIM, region))
    shim_offs = {w.addr - addr for w in writes}
    for off in changed_words(base, template):
        if off not in shim_offs:
            writes.append(
                Write(addr + off, _word(base, off), _word(template, off), TEMPLATE, region)
            )
    return writes


def _word(buf: bytes, off: int) -> int:
    return int.from_bytes(buf[off : off + WORD], sys.byteorder)


def _looks_like_pointer(value: int) -> bool:
    # User-space heap and mmap addresses on x86_64; refcounts, hashes of small
    # objects and flags are far below, random hashes rarely land in this range.
    return 0x5000_0000_0000 <= value < 0x8000_0000_0000


def field_of(obj: ObjectRecord | None, w: Write) -> str:
    """What kind of write this is: the object's field, or the allocator's metadata."""
    if obj is None:
        if w.region.startswith("[anon") and w.addr % POOL < POOL_HEADER:
            return "pymalloc pool header"
        if w.region == "[heap]" or w.region.startswith("[anon"):
            return "free memory (allocator links, freed blocks)"
        return f"static data ({w.region})"
    if obj.type == "static":
        return f"static {obj.name}"
    rel = w.addr - (obj.start + obj.pre)
    if rel < 0:
        return "PyGC_Head" if rel >= -16 else "managed dict/values pointer"
    if obj.type.endswith("-items") and obj.type != "dict-items":
        return "item array"
    if rel == 0:
        if _looks_like_pointer(w.new) and not _looks_like_pointer(w.old):
            return "freed (free-list link over ob_refcnt)"
        return "ob_refcnt"
    if rel == 8 and obj.type != "dict-items":
        return "ob_type (freed/reused)"
    if obj.type == "code":
        if rel >= _CODE_ADAPTIVE:
            return "co_code_adaptive (quickening, inline caches)"
        return _CODE_FIELDS.get(rel, f"code+{rel}")
    if obj.type == "type" or obj.type.endswith("Meta") or obj.type == "ABCMeta":
        return _TYPE_FIELDS.get(rel, f"type+{rel}")
    fields = _FIELDS.get(obj.type, {})
    if obj.type == "dict-items" and rel >= 32:
        return "dk_indices/entries"
    return fields.get(rel, f"{obj.type}+{rel}")


def static_symbols(library: str, base: int) -> list[ObjectRecord]:
    """A shared library's data and bss symbols (nm -S), at its load address."""
    import subprocess

    out = subprocess.run(
        ["nm", "-S", "--defined-only", library], capture_output=True, text=True, check=True
    ).stdout
    return parse_nm(out, base)


def parse_nm(text: str, base: int) -> list[ObjectRecord]:
    records: list[ObjectRecord] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "dDbB":
            size = int(parts[1], 16)
            if size:
                records.append(ObjectRecord(base + int(parts[0], 16), size, "static", "", parts[3]))
    return records


def _library_base(maps: Sequence[SmapsMapping], marker: str) -> tuple[str, int] | None:
    for m in maps:
        if marker in os.path.basename(m.path) and m.offset == 0:
            return m.path, m.start
    return None


def read_pages(pid: int, pages: Iterable[int]) -> dict[int, bytes]:
    """The content of the given pages of a process (root: /proc/<pid>/mem)."""
    out: dict[int, bytes] = {}
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for page in pages:
            try:
                data = os.pread(fd, PAGE, page)
            except OSError:
                continue
            if len(data) == PAGE:
                out[page] = data
    finally:
        os.close(fd)
    return out


def writable_pages(pid: int) -> list[int]:
    """Present pages of a process's writable private mappings."""
    pages: list[int] = []
    for m in read_smaps(pid):
        if "w" not in m.perms or m.perms.endswith("s") or m.path == "[vsyscall]":
            continue
        for i, entry in enumerate(read_pagemap(pid, m.start, m.end)):
            if entry & PM_PRESENT:
                pages.append(m.start + i * PAGE)
    return pages


def template_baseline(template_pid: int) -> dict[int, bytes]:
    """The template's writable memory now: taken just before a fork, it tells the
    shim's writes from the template's own later ones."""
    return read_pages(template_pid, writable_pages(template_pid))


def diff_writes(
    snap: Snapshot, template_pid: int, baseline: dict[int, bytes] | None
) -> tuple[list[Write], int]:
    """Every changed word on a shim's copied pages; and the number of copied pages on
    which neither side changed a word (written and restored: refcount up and down)."""
    import bisect

    maps = read_smaps(snap.pid)
    regions = {(m.start, m.end): name for name, m in zip(region_names(maps), maps, strict=True)}
    spans = sorted(regions)
    starts = [lo for lo, _ in spans]
    shim = read_pages(snap.pid, snap.copied_pages)
    template = read_pages(template_pid, snap.copied_pages)
    writes: list[Write] = []
    unchanged = 0
    for page, data in shim.items():
        if page not in template:
            continue
        i = bisect.bisect_right(starts, page) - 1
        region = regions[spans[i]] if i >= 0 and page < spans[i][1] else "?"
        base = baseline.get(page) if baseline is not None else None
        found = page_writes(page, base, data, template[page], region)
        if not found:
            unchanged += 1
        writes += found
    return writes, unchanged


@dataclass
class Tally:
    kb: float = 0.0  # share of copied pages: a page's 4 KB split over the words written on it
    words: int = 0
    objects: set[tuple[int, int]] = field(default_factory=set)  # (shim, address)


def _object_label(obj: ObjectRecord | None, w: Write) -> str:
    if obj is None:
        return f"(no object, {w.region})"
    if obj.type == "static":
        return f"static {obj.name}"
    text = f"{obj.type} {obj.where}:{obj.name}" if obj.where else f"{obj.type} {obj.name}"
    return text.rstrip(": ")


def tally_writes(
    diffs: Sequence[tuple[list[Write], int]], index: ObjectIndex
) -> dict[str, dict[str, Tally]]:
    """Per grouping ("side", "type", "field", "module/qualname", "object" the shim
    wrote, "template-side" objects): label -> tally, summed over the shims in ``diffs``."""
    groups: dict[str, dict[str, Tally]] = {
        k: {} for k in ("side", "type", "field", "module/qualname", "object", "template-side")
    }

    def add(group: str, label: str, kb: float, obj: ObjectRecord | None, shim: int) -> None:
        t = groups[group].setdefault(label, Tally())
        t.kb += kb
        t.words += 1
        if obj is not None:
            t.objects.add((shim, obj.start))

    for shim, (writes, unchanged) in enumerate(diffs):
        if unchanged:
            groups["side"].setdefault("written and restored (no word differs)", Tally()).kb += (
                unchanged * PAGE / 1024
            )
        by_page: dict[int, list[Write]] = {}
        for w in writes:
            by_page.setdefault(w.addr - w.addr % PAGE, []).append(w)
        for page_writes_ in by_page.values():
            ours = [w for w in page_writes_ if w.side == SHIM]
            if not ours:
                # Copied, though only the template changed it: the shim holds the old page.
                for w in page_writes_:
                    obj = index.find(w.addr)
                    share = PAGE / 1024 / len(page_writes_)
                    add("side", "template wrote after the fork", share, obj, shim)
                    label = f"{_object_label(obj, w)} [{field_of(obj, w)}]"
                    add("template-side", label, share, obj, shim)
                continue
            share = PAGE / 1024 / len(ours)
            for w in ours:
                obj = index.find(w.addr)
                kind = field_of(obj, w)
                add("side", "shim wrote", share, obj, shim)
                add("type", obj.type if obj else "(no object)", share, obj, shim)
                add("field", kind, share, obj, shim)
                where = f"{obj.where} {obj.name}".strip() if obj else ""
                add("module/qualname", where or _object_label(obj, w), share, obj, shim)
                add("object", f"{_object_label(obj, w)} [{kind}]", share, obj, shim)
    return groups


def format_writers(
    phase: str, diffs: Sequence[tuple[list[Write], int]], index: ObjectIndex, top: int
) -> str:
    n = max(1, len(diffs))
    groups = tally_writes(diffs, index)
    out = [f"\n## {phase}: who wrote the copied pages (per shim, n={len(diffs)})"]
    for group, rows in groups.items():
        out.append(f"\n### by {group}")
        out.append("| label | KB/shim (page share) | words/shim | objects/shim |")
        out.append("| --- | ---: | ---: | ---: |")
        ranked = sorted(rows.items(), key=lambda kv: -kv[1].kb)
        for label, t in ranked[: top if group != "side" else None]:
            out.append(
                f"| {label} | {t.kb / n:.0f} | {t.words / n:.0f} | {len(t.objects) / n:.0f} |"
            )
    return "\n".join(out)


# -- instrumented template -------------------------------------------------------


def run_template(directory: str, dump: str | None, prepare: str | None) -> int:
    """shim.boot.template.serve, with an optional ``module:function`` to call and an
    object dump (from a forked child, so the template's own heap stays as it is)
    just before gc.freeze()."""
    import gc
    import importlib

    from shim.boot import cli, template

    real_freeze = gc.freeze

    def freeze() -> None:
        gc.freeze = real_freeze
        if prepare:
            module, _, func = prepare.partition(":")
            getattr(importlib.import_module(module), func)()
        if dump:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    dump_objects(dump)
                    code = 0
                except BaseException:
                    import traceback

                    with open(dump + ".error", "w") as f:
                        traceback.print_exc(file=f)
                finally:
                    os._exit(code)
            os.waitpid(pid, 0)
        real_freeze()

    gc.freeze = freeze
    return template.serve(directory, main=cli.main)


TRACE_DIR_ENV = "COW_TRACE_DIR"


def _after_each_start(record: Callable[[int], None]) -> None:
    """Have every daemon forked from here call ``record(n)`` after the n-th Start it
    serves (before answering it)."""
    from shim.task import service

    real_start = service.TaskService.start
    served = [0]

    async def start(
        self: service.TaskService, req: shim_pb2.StartRequest
    ) -> shim_pb2.StartResponse:
        response = await real_start(self, req)
        served[0] += 1
        record(served[0])
        return response

    service.TaskService.start = start  # type: ignore[method-assign]


def trace_allocations() -> None:
    """A ``--prepare`` hook: every daemon forked from here traces its allocations
    (tracemalloc, from the freeze on) and writes a snapshot to
    ``$COW_TRACE_DIR/<pid>-<n>.snap`` after the n-th Start it serves."""
    import gc
    import tracemalloc

    out = os.environ[TRACE_DIR_ENV]

    def record(n: int) -> None:
        gc.collect()  # what the request left for the collector is not a cost
        tracemalloc.take_snapshot().dump(os.path.join(out, f"{os.getpid()}-{n}.snap"))

    _after_each_start(record)
    tracemalloc.start(12)


FORK = "(forked: before its first call)"
OUTSIDE = "(no frame of ours)"


class CopyTally:
    """Private memory a process gained, by who ran while it grew.

    Fed a reading of the process's private KB at each call and return of one of our
    functions; the growth since the previous reading goes to the function that was
    running in between. What a function's first run copies includes the first run of
    whatever it calls outside our packages (the stdlib, asyncio), so a row is "what
    copying happened first here", not what would disappear with that function."""

    def __init__(self) -> None:
        self.last: int | None = None
        self.kb: dict[object, int] = {}

    def reading(self, private_kb: int, owner: object) -> None:
        if self.last is None:
            self.kb[FORK] = private_kb
        elif private_kb != self.last:
            self.kb[owner] = self.kb.get(owner, 0) + private_kb - self.last
        self.last = private_kb


def code_label(code: object) -> str:
    if not isinstance(code, types.CodeType):
        return str(code)
    where = code.co_filename
    for tree in ("/shim/", "/protocol/"):
        if tree in where:
            where = tree[1:] + where.rsplit(tree, 1)[1]
            break
    return f"{where}:{code.co_firstlineno} {code.co_qualname}"


def trace_copies() -> None:
    """A ``--prepare`` hook: every daemon forked from here reads its private memory
    at each call and return of a function of ours (sys.setprofile, from the fork on:
    slow) and writes ``$COW_TRACE_DIR/<pid>-<n>.copies.json`` after the n-th Start
    it serves: KB by function (CopyTally), and the modules imported since the
    freeze (each one built in every daemon's own memory)."""
    import json

    from bench.procfs import read_memory

    out = os.environ[TRACE_DIR_ENV]
    frozen = set(sys.modules)
    tally = CopyTally()

    def ours(code: types.CodeType) -> bool:
        return "/shim/" in code.co_filename or "/protocol/" in code.co_filename

    def owner(frame: types.FrameType | None) -> object:
        while frame is not None:
            if ours(frame.f_code):
                return frame.f_code
            frame = frame.f_back
        return OUTSIDE

    def profile(frame: types.FrameType, event: str, arg: object) -> None:
        if (event == "call" or event == "return") and ours(frame.f_code):
            who = owner(frame.f_back) if event == "call" else frame.f_code
            tally.reading(read_memory(os.getpid()).private_kb, who)

    def record(n: int) -> None:
        rows = sorted(((code_label(k), kb) for k, kb in tally.kb.items()), key=lambda r: -r[1])
        body = {
            "private_kb": tally.last,
            "kb": dict(rows),
            "imported": sorted(set(sys.modules) - frozen),
        }
        with open(os.path.join(out, f"{os.getpid()}-{n}.copies.json"), "w") as f:
            json.dump(body, f, indent=1)

    _after_each_start(record)
    os.register_at_fork(after_in_child=lambda: sys.setprofile(profile))


def code_names() -> dict[types.CodeType, str]:
    """``module:qualname`` (what shim/boot/hotcode.py lists) of the code object of
    every function outside our packages that prefork.compact_hot can find."""
    from shim.boot import prefork

    names: dict[types.CodeType, str] = {}
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name.partition(".")[0] in prefork.PACKAGES:
            continue
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict):
            for func in prefork.functions_of(namespace, module_name):
                names.setdefault(func.__code__, f"{func.__module__}:{func.__qualname__}")
    return names


def trace_code() -> None:
    """A ``--prepare`` hook: every daemon forked from here notes each function it
    calls (sys.setprofile, from the fork on) and writes the ones outside our packages
    (which shim.boot.prefork compacts anyway), as ``module:qualname`` in the order of
    their first call, to ``$COW_TRACE_DIR/<pid>-<n>.code.json`` after the n-th Start
    it serves. ``hotcode`` turns those files into shim/boot/hotcode.py."""
    import json

    out = os.environ[TRACE_DIR_ENV]
    called: dict[types.CodeType, None] = {}  # insertion-ordered set

    def profile(frame: types.FrameType, event: str, arg: object) -> None:
        if event == "call":
            called.setdefault(frame.f_code)

    def record(n: int) -> None:
        sys.setprofile(None)  # what code_names() calls is not the daemon's
        names = code_names()
        ordered = [names[code] for code in list(called) if code in names]
        with open(os.path.join(out, f"{os.getpid()}-{n}.code.json"), "w") as f:
            json.dump(list(dict.fromkeys(ordered)), f, indent=0)
        sys.setprofile(profile)

    _after_each_start(record)
    os.register_at_fork(after_in_child=lambda: sys.setprofile(profile))


HOTCODE_HEADER = '''"""Functions outside our packages that every daemon runs, as ``module:qualname``
in the order a daemon first calls them: shim.boot.prefork gives them fresh code
objects, allocated together, so that the pages a daemon un-shares by running them
are few and dense (bench/README.md, "Hot code outside our packages").

Generated (on Python {version}) by:

    COW_TRACE_DIR=DIR python -m bench.cow run --containers 3 --prepare bench.cow:trace_code
    python -m bench.cow hotcode DIR/*.code.json > shim/boot/hotcode.py

A name this Python does not have is skipped, so a list made on another version
still compacts what it names.
"""

FUNCTIONS: tuple[str, ...] = (
'''


def format_hotcode(lists: Sequence[Sequence[str]], version: str) -> str:
    """shim/boot/hotcode.py for the functions every one of ``lists`` (trace_code's
    files) names, in the first list's order."""
    common = set(lists[0]).intersection(*lists[1:]) if lists else set()
    names = [name for name in (lists[0] if lists else []) if name in common]
    body = "".join(f'    "{name}",\n' for name in names)
    return HOTCODE_HEADER.format(version=version) + body + ")\n"


def format_copies(paths: Sequence[str], top: int) -> str:
    """trace_copies' files, the mean of each function's KB over them."""
    import json

    bodies = []
    for path in paths:
        with open(path) as f:
            bodies.append(json.load(f))
    if not bodies:
        return "no files"
    sums: dict[str, float] = {}
    for body in bodies:
        for label, kb in body["kb"].items():
            sums[label] = sums.get(label, 0) + kb
    n = len(bodies)
    totals = [b["private_kb"] for b in bodies]
    imported = sorted({m for b in bodies for m in b["imported"]})
    lines = [
        f"{n} daemons, private KB after Start: {totals}",
        f"imported after the freeze: {', '.join(imported) or 'nothing'}",
        "| KB (mean) | first copied while running |",
        "| ---: | --- |",
    ]
    ranked = sorted(sums.items(), key=lambda kv: -kv[1])[:top]
    lines += [f"| {kb / n:.0f} | {label} |" for label, kb in ranked]
    return "\n".join(lines)


def format_traces(first: str, last: str | None, top: int) -> str:
    """What a daemon holds at ``first`` (by line), or what it gained from ``first`` to
    ``last``; tracemalloc's own allocations left out."""
    import tracemalloc

    own = [tracemalloc.Filter(False, tracemalloc.__file__)]
    a = tracemalloc.Snapshot.load(first).filter_traces(own)
    total_a = sum(t.size for t in a.traces)
    if last is None:
        lines = [f"{total_a / 1024:.1f} KB in {len(a.traces)} blocks"]
        lines += [str(st) for st in a.statistics("lineno")[:top]]
        return "\n".join(lines)
    b = tracemalloc.Snapshot.load(last).filter_traces(own)
    total_b = sum(t.size for t in b.traces)
    lines = [f"{total_a / 1024:.1f} -> {total_b / 1024:.1f} KB"]
    lines += [str(st) for st in b.compare_to(a, "lineno")[:top]]
    return "\n".join(lines)


def template_command(
    launcher: str, directory: str, dump: str | None, prepare: str | None
) -> list[str]:
    """The instrumented template, run the way ``launcher`` runs the shim (-IS and its
    sys.path), so its code key is the one `start` asks for."""
    with open(launcher) as f:
        text = f.read()
    marker = "sys.path.extend("
    at = text.index(marker) + len(marker)
    paths = text[at : text.index(")", at)]
    code = (
        f"import sys; sys.path.extend({paths}); from bench.cow import run_template; "
        f"sys.exit(run_template({directory!r}, {dump!r}, {prepare!r}))"
    )
    return [sys.executable, "-IS", "-c", code]


_SNAPSHOT_TREES = ("shim", "protocol", "bench", "tests/support")


def pin_sources(source: Path, dest: Path) -> Path:
    """A copy of the code under ``dest`` and a launcher running it; the launcher's path.

    Shims and template then run code nobody edits during the run (an edit changes
    the template's code key, and `start` would spawn an uninstrumented template),
    and ``source`` may be a tree with local changes (e.g. to shim/boot/template.py).
    """
    import shutil

    for rel in _SNAPSHOT_TREES:
        shutil.copytree(source / rel, dest / "src" / rel, ignore=shutil.ignore_patterns("results"))
    (dest / "src" / "tests" / "__init__.py").touch()
    venv_launcher = os.path.join(os.path.dirname(sys.executable), LAUNCHER)
    with open(venv_launcher) as f:
        text = f.read()
    repo = _repo()
    if repr(repo) not in text:
        raise RuntimeError(f"{venv_launcher} does not name {repo} in its sys.path")
    (dest / "bin").mkdir()
    launcher = dest / "bin" / LAUNCHER
    launcher.write_text(text.replace(repr(repo), repr(str(dest / "src"))))
    launcher.chmod(0o755)
    return launcher


# -- the measured run ------------------------------------------------------------


@dataclass
class PhaseResult:
    phase: str
    snapshots: list[Snapshot]
    diffs: list[tuple[list[Write], int]] = field(default_factory=list)


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    import time

    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout}s")
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    from shim.sys.procfs import stat_fields

    try:
        return stat_fields(pid)[0] != b"Z"
    except (OSError, IndexError, ValueError):
        return False


def _stop_pid(pid: int) -> None:
    import contextlib
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    try:
        _wait_for(lambda: not _alive(pid), 5, f"pid {pid} gone")
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


Diff = tuple[list[Write], int]


def _probe(
    workdir: Path, template_dir: Path, key: str, template_pid: int, settle: float, diff: bool
) -> tuple[Snapshot, Snapshot, list[Diff]]:
    """A daemon forked straight from the template (no containerd, no container):
    measured while it waits for "go", then serving (and their diffs with ``diff``)."""
    import socket
    import time

    from shim.boot import templateclient

    bundle = workdir / "probe"
    bundle.mkdir(exist_ok=True)
    path = str(bundle / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    argv = ["containerd-shim-pyshim-v1", "-namespace", "cow", "-address", str(workdir / "none")]
    argv += ["-publish-binary", "/bin/true", "-id", "probe"]
    cwd = os.getcwd()
    os.chdir(bundle)
    before = frames(template_pid)
    baseline = template_baseline(template_pid) if diff else None
    diffs: list[Diff] = []
    try:
        forked = templateclient.fork_daemon(argv, listener, directory=str(template_dir), key=key)
    finally:
        os.chdir(cwd)
        listener.close()
    if forked is None:
        err = workdir / "template.err"
        said = err.read_text()[-2000:] if err.exists() else ""
        raise RuntimeError(f"the template did not fork a daemon; its stderr: {said}")
    pid = forked.pid
    try:
        time.sleep(settle)
        # Pages the template itself wrote while forking: the child keeps the old
        # frames, now mapped by it alone, though it never touched them.
        template_wrote = moved_frames(before, frames(template_pid))
        waiting = snapshot(pid, template_pid)
        waiting.template_wrote = template_wrote
        if baseline is not None:
            diffs.append(diff_writes(waiting, template_pid, baseline))
        forked.go()

        from tests.support.containerd import socket_accepts

        _wait_for(lambda: socket_accepts(path), 10, "probe daemon serving")
        time.sleep(settle)
        serving_snap = snapshot(pid, template_pid)
        if baseline is not None:
            diffs.append(diff_writes(serving_snap, template_pid, baseline))
        return waiting, serving_snap, diffs
    finally:
        _stop_pid(pid)
        if os.path.exists(path):
            os.unlink(path)


def measure(
    source: Path,
    containers: int,
    idle: float,
    prepare: str | None,
    probes: int,
    log: object = print,
    diff: bool = False,
    pod_size: int = 1,
) -> tuple[list[PhaseResult], list[ObjectRecord], dict[str, int]]:
    import secrets
    import shutil
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    from bench.containerd_env import PrivateContainerd
    from bench.procfs import read_memory
    from bench.scenarios import IDLE_CMD, IMAGE, RUNTIMES, SANDBOX_ANNOTATION
    from crashtest.images import build_busybox_oci_archive

    assert callable(log)
    if pod_size < 1:
        raise ValueError("a pod holds at least one container")
    workdir = Path(tempfile.mkdtemp(prefix="pyshim-cow-", dir="/tmp"))
    launcher = pin_sources(source, workdir)

    class Env(PrivateContainerd):
        def env(self) -> dict[str, str]:
            env = super().env()
            env["PATH"] = f"{launcher.parent}{os.pathsep}{env['PATH']}"
            return env

    dump = workdir / "objects.tsv"
    tproc: subprocess.Popen[bytes] | None = None
    started: list[str] = []
    phases: list[PhaseResult] = []
    (workdir / "ctrd").mkdir()
    env = Env(workdir / "ctrd", namespace=f"cow-{secrets.token_hex(3)}")
    try:
        env.start()
        archive = workdir / "busybox.tar"
        build_busybox_oci_archive(archive, IMAGE)
        env.import_image(archive)
        env.template_dir.mkdir(mode=0o700)
        terr = workdir / "template.err"
        with open(terr, "wb") as err:
            tproc = subprocess.Popen(
                template_command(str(launcher), str(env.template_dir), str(dump), prepare),
                stdin=subprocess.DEVNULL,
                stderr=err,
                env=env.env(),
                start_new_session=True,
            )
        template_pid = tproc.pid

        def bound() -> bool:
            if tproc.poll() is not None:
                raise RuntimeError(f"template exited: {terr.read_text()[-2000:]}")
            return any(n.endswith(".sock") for n in os.listdir(env.template_dir))

        _wait_for(bound, 60, "template socket")
        key = next(n for n in os.listdir(env.template_dir) if n.endswith(".sock"))[:-5]
        time.sleep(0.3)
        log(f"template pid {template_pid}: {read_memory(template_pid)}")
        forked, serving = PhaseResult("forked", []), PhaseResult("serving", [])
        for _ in range(probes):
            w, s, diffs = _probe(workdir, env.template_dir, key, template_pid, 0.5, diff)
            forked.snapshots.append(w)
            serving.snapshots.append(s)
            if diffs:
                forked.diffs.append(diffs[0])
                serving.diffs.append(diffs[1])
        phases += [forked, serving]
        after_start = PhaseResult("started", [])
        joined = PhaseResult("joined", [])
        seen: set[int] = set()
        for i in range(containers):
            cid = f"cow-{i}"
            env.container_ids.add(cid)
            started.append(cid)
            extra: list[str] = []
            if pod_size > 1:
                pod = f"cow-pod-{i // pod_size}"
                env.container_ids.add(pod)  # its shim's socket is named for the pod
                extra = ["--annotation", f"{SANDBOX_ANNOTATION}={pod}"]
            first = i % pod_size == 0
            # The spare serving this run was forked when the last hand-over ended,
            # and the template has idled in poll(2) since.
            baseline = template_baseline(template_pid) if diff and first else None
            env.ctr("run", "-d", "--runtime", RUNTIMES["py"], "--fifo-dir", str(env.fifo_dir),
                    *extra, IMAGE, cid, *IDLE_CMD)  # fmt: skip
            pids = [s.pid for s in env.shims() if s.pid not in seen]
            if len(pids) != (1 if first else 0):
                raise RuntimeError(f"container {i + 1}: unexpected new shims {pids}")
            if not first:
                if i % pod_size == pod_size - 1:
                    joined.snapshots.append(snapshot(max(seen), template_pid))
                continue
            seen.add(pids[0])
            snap = snapshot(pids[0], template_pid)
            after_start.snapshots.append(snap)
            if baseline is not None:
                after_start.diffs.append(diff_writes(snap, template_pid, baseline))
                baseline = None
        if env.template_pids():
            raise RuntimeError("`start` spawned its own template: the code keys differ")
        phases.append(after_start)
        if joined.snapshots:
            phases.append(joined)
        time.sleep(idle)
        phases.append(PhaseResult("idle", [snapshot(pid, template_pid) for pid in sorted(seen)]))
        objects = parse_object_dump(dump.read_text().splitlines())
        if diff:
            library = _library_base(read_smaps(template_pid), "libpython")
            if library is not None:
                objects += static_symbols(*library)
        tmem = read_memory(template_pid)
        pss = [read_memory(pid).pss_kb for pid in sorted(seen)]
        return (
            phases,
            objects,
            {
                "template_pss_kb": tmem.pss_kb,
                "template_rss_kb": tmem.rss_kb,
                "pss_per_container_incl_template_kb": (sum(pss) + tmem.pss_kb) // max(1, len(pss)),
            },
        )
    finally:
        try:
            env.remove_containers(started)
        finally:
            if tproc is not None:
                tproc.terminate()
                try:
                    tproc.wait(10)
                except subprocess.TimeoutExpired:
                    tproc.kill()
                    tproc.wait(10)
            env.close()
            shutil.rmtree(workdir, ignore_errors=True)


# -- reporting -------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    from bench.stats import percentile

    return percentile(values, 50) if values else 0.0


def phase_summary(phase: PhaseResult) -> dict[str, object]:
    snaps = phase.snapshots
    regions: dict[str, dict[str, float]] = {}
    names = sorted({n for s in snaps for n in s.regions})
    for name in names:
        rows = [s.regions.get(name, RegionCount(name)) for s in snaps]
        regions[name] = {
            "private_kb": _median([r.private * PAGE / 1024 for r in rows]),
            "copied_kb": _median([r.copied * PAGE / 1024 for r in rows]),
            "new_kb": _median([r.new * PAGE / 1024 for r in rows]),
        }
    totals = [s.total() for s in snaps]
    return {
        "phase": phase.phase,
        "n": len(snaps),
        "pss_kb": _median([s.pss_kb for s in snaps]),
        "private_kb": _median([s.private_kb for s in snaps]),
        "copied_kb": _median([t.copied * PAGE / 1024 for t in totals]),
        "new_kb": _median([t.new * PAGE / 1024 for t in totals]),
        "template_wrote_kb": _median([s.template_wrote * PAGE / 1024 for s in snaps]),
        "regions": {k: v for k, v in regions.items() if v["private_kb"]},
    }


def attribution_table(
    objects: Sequence[ObjectRecord], snaps: Sequence[Snapshot], by: str, top: int
) -> list[tuple[str, float, float, float]]:
    """(label, KB on copied pages per shim, KB in the template, % of it on copied pages)."""
    total: dict[str, int] = {}
    overall: dict[str, int] = {}
    for s in snaps:
        on, overall = attribute(objects, s.copied_pages, by=by)
        for k, v in on.items():
            total[k] = total.get(k, 0) + v
    n = max(1, len(snaps))
    rows = [
        (k, v / n / 1024, overall.get(k, 0) / 1024, 100 * v / n / overall[k] if k in overall else 0)
        for k, v in total.items()
    ]
    rows.sort(key=lambda r: -r[1])
    return rows[:top]


def format_report(
    phases: Sequence[PhaseResult], objects: Sequence[ObjectRecord], top: int = 25
) -> str:
    out: list[str] = []
    for ph in phases:
        s = phase_summary(ph)
        out.append(
            f"## {s['phase']} (n={s['n']}): PSS {s['pss_kb']:.0f} KB, private "
            f"{s['private_kb']:.0f} KB = copied {s['copied_kb']:.0f} + new {s['new_kb']:.0f}"
            f" (copies the template made while forking: {s['template_wrote_kb']:.0f} KB)"
        )
        regions = s["regions"]
        assert isinstance(regions, dict)
        out.append("| mapping | private KB | copied KB | new KB |\n| --- | ---: | ---: | ---: |")
        for name, r in sorted(regions.items(), key=lambda kv: -kv[1]["private_kb"]):
            out.append(
                f"| {name} | {r['private_kb']:.0f} | {r['copied_kb']:.0f} | {r['new_kb']:.0f} |"
            )
    if objects and phases:
        last = phases[-1]
        for by in ("type", "where"):
            out.append(f"\n## {last.phase}: KB of copied pages per shim, by {by}")
            out.append("| label | KB/shim on copied pages | KB in template | % |")
            out.append("| --- | ---: | ---: | ---: |")
            for label, kb, tkb, pct in attribution_table(objects, last.snapshots, by, top):
                out.append(f"| {label} | {kb:.0f} | {tkb:.0f} | {pct:.0f} |")
    if any(ph.diffs for ph in phases):
        index = ObjectIndex(objects)
        for ph in phases:
            if ph.diffs:
                out.append(format_writers(ph.phase, ph.diffs, index, top))
    return "\n".join(out)


def _repo() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m bench.cow", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="private containerd + instrumented template, all phases")
    run.add_argument("--containers", type=int, default=10)
    run.add_argument("--pod-size", type=int, default=1, help="containers per shim (CRI pods)")
    run.add_argument("--idle", type=float, default=10.0)
    run.add_argument("--probes", type=int, default=3)
    run.add_argument(
        "--prepare", metavar="MODULE:FUNC", help="call this in the template before gc.freeze()"
    )
    run.add_argument("--top", type=int, default=25)
    run.add_argument("--src", default=_repo(), help="tree to run (copied first): default this repo")
    run.add_argument("--out", help="JSON summary")
    run.add_argument("--diff", action="store_true", help="who wrote the copied pages (slow)")
    snap = sub.add_parser("snapshot", help="one running shim against its template")
    snap.add_argument("pid", type=int)
    snap.add_argument("--template", type=int, required=True)
    snap.add_argument("--objects", help="object dump of the template")
    snap.add_argument("--top", type=int, default=25)
    snap.add_argument(
        "--diff", action="store_true", help="changed words (no fork-time copy: sides unknown)"
    )
    hot = sub.add_parser("hotcode", help="trace_code's files as shim/boot/hotcode.py")
    hot.add_argument("files", nargs="+")
    copies = sub.add_parser("copies", help="trace_copies' files: KB by function, averaged")
    copies.add_argument("files", nargs="+")
    copies.add_argument("--top", type=int, default=40)
    traces = sub.add_parser("traces", help="compare two trace_allocations snapshots")
    traces.add_argument("first")
    traces.add_argument("last", nargs="?")
    traces.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    if args.cmd == "traces":
        print(format_traces(args.first, args.last, args.top))
        return 0
    if args.cmd == "hotcode":
        lists = []
        for path in args.files:
            with open(path) as f:
                lists.append(json.load(f))
        version = ".".join(str(n) for n in sys.version_info[:3])
        sys.stdout.write(format_hotcode(lists, version))
        return 0
    if args.cmd == "copies":
        print(format_copies(args.files, args.top))
        return 0
    if os.geteuid() != 0:
        print("needs root: page frame numbers in pagemap are hidden otherwise", file=sys.stderr)
        return 2
    objects: list[ObjectRecord] = []
    if args.cmd == "snapshot":
        if args.objects:
            with open(args.objects) as f:
                objects = parse_object_dump(f)
        one = snapshot(args.pid, args.template)
        phases = [PhaseResult("snapshot", [one])]
        if args.diff:
            phases[0].diffs.append(diff_writes(one, args.template, None))
            library = _library_base(read_smaps(args.template), "libpython")
            if library is not None:
                objects += static_symbols(*library)
        print(format_report(phases, objects, args.top))
        return 0
    phases, objects, extra = measure(
        Path(args.src), args.containers, args.idle, args.prepare, args.probes,
        lambda m: print(m, file=sys.stderr, flush=True), args.diff, args.pod_size,
    )  # fmt: skip
    print(f"template: {extra}")
    print(format_report(phases, objects, args.top))
    if args.out:
        body = {
            "prepare": args.prepare,
            "pod_size": args.pod_size,
            **extra,
            "phases": [phase_summary(p) for p in phases],
            "by_type": attribution_table(objects, phases[-1].snapshots, "type", args.top),
            "by_where": attribution_table(objects, phases[-1].snapshots, "where", args.top),
        }
        with open(args.out, "w") as f:
            json.dump(body, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
