"""Parsers and page accounting of bench/cow.py (copy-on-write of forked shims)."""

from __future__ import annotations

import re
import struct
import tracemalloc
from pathlib import Path

import pytest

from bench.cow import (
    FORK,
    FREE,
    PAGE,
    PFN_MASK,
    PM_EXCLUSIVE,
    PM_PRESENT,
    SHIM,
    TEMPLATE,
    CopyTally,
    ObjectIndex,
    ObjectRecord,
    RegionCount,
    Write,
    attribute,
    changed_words,
    classify_pages,
    code_label,
    decode_pagemap,
    field_of,
    format_copies,
    format_hotcode,
    format_traces,
    page_writes,
    parse_nm,
    parse_object_dump,
    parse_smaps,
    region_names,
    tally_writes,
)

SMAPS = """\
55d0c0a00000-55d0c0c00000 rw-p 00000000 00:00 0                          [heap]
Size:               2048 kB
Rss:                1900 kB
Pss:                 700 kB
Private_Dirty:       600 kB
VmFlags: rd wr mr mw me ac sd
7f1e2a000000-7f1e2a100000 rw-p 00000000 00:00 0
Size:               1024 kB
Private_Dirty:        40 kB
7f1e2b000000-7f1e2b200000 rw-p 0031a000 08:01 1234               /usr/lib/libpython3.11.so.1.0
Size:               2048 kB
Private_Dirty:       848 kB
THPeligible:    0
"""


def test_parse_smaps_headers_and_fields() -> None:
    maps = parse_smaps(SMAPS)
    assert [(m.start, m.end, m.perms, m.inode) for m in maps] == [
        (0x55D0C0A00000, 0x55D0C0C00000, "rw-p", 0),
        (0x7F1E2A000000, 0x7F1E2A100000, "rw-p", 0),
        (0x7F1E2B000000, 0x7F1E2B200000, "rw-p", 1234),
    ]
    assert maps[0].path == "[heap]"
    assert maps[1].path == ""
    assert maps[2].path == "/usr/lib/libpython3.11.so.1.0"
    # "VmFlags" and "THPeligible" have no kB unit: not fields.
    assert maps[0].fields == {"Size": 2048, "Rss": 1900, "Pss": 700, "Private_Dirty": 600}
    assert maps[2].fields["Private_Dirty"] == 848
    assert maps[1].size == 1 << 20


def test_parse_smaps_rejects_truncated_header() -> None:
    with pytest.raises(ValueError):
        parse_smaps("55d0c0a00000-55d0c0c00000 rw-p 00000000\n")


def test_region_names() -> None:
    assert region_names(parse_smaps(SMAPS)) == [
        "[heap]",
        "[anon rw-p]",
        "libpython3.11.so.1.0 rw-p",
    ]


def test_decode_pagemap_native_words() -> None:
    raw = struct.pack("=3Q", PM_PRESENT | PM_EXCLUSIVE | 7, 0, PM_PRESENT | 9)
    assert list(decode_pagemap(raw)) == [PM_PRESENT | PM_EXCLUSIVE | 7, 0, PM_PRESENT | 9]
    with pytest.raises(ValueError):
        decode_pagemap(b"\0" * 12)


def test_classify_pages() -> None:
    base = 0x10000
    shim = [
        PM_PRESENT | 5,  # same frame as the template: still shared
        PM_PRESENT | PM_EXCLUSIVE | 6,  # own frame where the template has one: a copy
        PM_PRESENT | PM_EXCLUSIVE | 7,  # own frame, template has nothing: new
        0,  # not present
        PM_PRESENT | 8,  # shared, but not with the template (another shim)
    ]
    template = [PM_PRESENT | 5, PM_PRESENT | 50, 0, PM_PRESENT | 1, PM_PRESENT | 51]
    count = RegionCount("x")
    copied = classify_pages(base, shim, template, count)
    assert copied == [base + PAGE]
    assert (count.present, count.private, count.copied, count.new) == (4, 2, 1, 1)
    assert count.shared_template == 1


def test_classify_pages_without_template() -> None:
    count = RegionCount("x")
    assert classify_pages(0, [PM_PRESENT | PM_EXCLUSIVE | 3], None, count) == []
    assert (count.private, count.new, count.copied) == (1, 1, 0)
    assert PFN_MASK & (PM_PRESENT | 3) == 3


def test_parse_object_dump() -> None:
    lines = ["1000\t48\tstr\t\n", "1030\t200\tfunction\tshim/daemon.py\n"]
    assert parse_object_dump(lines) == [
        ObjectRecord(0x1000, 48, "str", ""),
        ObjectRecord(0x1030, 200, "function", "shim/daemon.py"),
    ]
    with pytest.raises(ValueError):
        parse_object_dump(["1000\t48\n"])


def test_attribute_splits_objects_across_pages() -> None:
    objects = [
        ObjectRecord(0x1000, 100, "str", ""),
        # Straddles the boundary of the pages at 0x1000 and 0x2000.
        ObjectRecord(0x2000 - 50, 150, "code", "shim/daemon.py"),
        ObjectRecord(0x5000, 64, "dict", ""),
    ]
    on_pages, overall = attribute(objects, [0x1000])
    assert on_pages == {"str": 100, "code": 50, FREE: PAGE - 150}
    assert overall == {"str": 100, "code": 150, "dict": 64}
    on_pages, _ = attribute(objects, [0x2000], by="where")
    assert on_pages == {"shim/daemon.py": 100, FREE: PAGE - 100}
    on_pages, _ = attribute(objects, [0x2000], by="both")
    assert on_pages["code shim/daemon.py"] == 100


# -- diff mode -------------------------------------------------------------------


def _words(*values: int) -> bytes:
    return b"".join(struct.pack("<Q", v) for v in values)


def test_changed_words_finds_differing_word_offsets() -> None:
    old = _words(1, 2, 3, 4)
    new = _words(1, 9, 3, 5)
    assert changed_words(old, new) == [8, 24]
    assert changed_words(old, old) == []
    with pytest.raises(ValueError):
        changed_words(old, old[:-1])


def test_page_writes_tells_shim_from_template() -> None:
    base = _words(1, 2, 3, 4)
    shim = _words(7, 2, 3, 4)  # the shim changed word 0
    template = _words(1, 2, 8, 4)  # the template changed word 2 after the fork
    writes = page_writes(0x1000, base, shim, template, "[heap]")
    assert [(w.addr, w.old, w.new, w.side) for w in writes] == [
        (0x1000, 1, 7, SHIM),
        (0x1010, 3, 8, TEMPLATE),
    ]
    # Without the fork-time page every difference is the shim's.
    unknown = page_writes(0x1000, None, shim, template, "[heap]")
    assert [(w.addr, w.old, w.new, w.side) for w in unknown] == [
        (0x1000, 1, 7, SHIM),
        (0x1010, 8, 3, SHIM),
    ]


def test_object_index_finds_innermost_object() -> None:
    outer = ObjectRecord(0x1000, 0x1000, "static", "", "_PyRuntime")
    inner = ObjectRecord(0x1100, 32, "int", "")
    other = ObjectRecord(0x3000, 16, "str", "")
    index = ObjectIndex([other, inner, outer])
    assert index.find(0x1108) is inner
    assert index.find(0x1200) is outer
    assert index.find(0x3008) is other
    assert index.find(0x2800) is None
    assert index.find(0x10) is None


def _write(addr: int, old: int = 1, new: int = 2, region: str = "[anon rw-p]") -> Write:
    return Write(addr, old, new, SHIM, region)


def test_field_of_names_header_fields_and_code_areas() -> None:
    code = ObjectRecord(0x10000, 600, "code", "shim/x.py", "f", 16)
    obj = code.start + code.pre
    assert field_of(code, _write(obj)) == "ob_refcnt"
    assert field_of(code, _write(obj - 8)) == "PyGC_Head"
    assert field_of(code, _write(obj + 48)) == "co_flags/co_warmup"
    assert field_of(code, _write(obj + 200)).startswith("co_code_adaptive")
    assert field_of(code, _write(obj + 8)) == "ob_type (freed/reused)"
    # A refcount overwritten by a heap pointer: pymalloc's free list link.
    freed = _write(obj, old=3, new=0x55D0C0A01230)
    assert field_of(code, freed).startswith("freed")
    keys = ObjectRecord(0x20000, 200, "dict-items", "", "module shim.x")
    assert field_of(keys, _write(0x20008)) == "dk_version"
    assert field_of(keys, _write(0x20040)) == "dk_indices/entries"
    assert field_of(None, _write(0x7F0000004000 + 16)) == "pymalloc pool header"
    assert field_of(None, _write(0x7F0000004000 + 64)).startswith("free memory")
    assert field_of(None, _write(0x7F00, region="libc.so.6 rw-p")).startswith("static data")


def test_parse_object_dump_with_names_and_nm_symbols() -> None:
    (rec,) = parse_object_dump(["7f00\t120\tfunction\tshim/x.py\tA.f\t16\n"])
    assert rec == ObjectRecord(0x7F00, 120, "function", "shim/x.py", "A.f", 16)
    nm = (
        "0000000000416000 0000000000000400 d some_table\n"
        "0000000000417000 0000000000000010 T PyLong_FromLong\n"
        "0000000000418000 0000000000000000 b empty\n"
        "0000000000419000 B no_size\n"
    )
    assert parse_nm(nm, 0x7F0000000000) == [
        ObjectRecord(0x7F0000416000, 0x400, "static", "", "some_table")
    ]


def test_tally_writes_splits_each_page_among_its_writers() -> None:
    a = ObjectRecord(0x10000, 64, "str", "", "'a'")
    b = ObjectRecord(0x10040, 64, "tuple", "")
    writes = [_write(0x10000), _write(0x10040), Write(0x20000, 1, 2, TEMPLATE, "[heap]")]
    groups = tally_writes([(writes, 3)], ObjectIndex([a, b]))
    assert groups["type"]["str"].kb == groups["type"]["tuple"].kb == PAGE / 1024 / 2
    assert groups["side"]["shim wrote"].kb == PAGE / 1024
    assert groups["side"]["template wrote after the fork"].kb == PAGE / 1024
    assert groups["side"]["written and restored (no word differs)"].kb == 3 * PAGE / 1024
    assert groups["field"]["ob_refcnt"].words == 2


def _grow(held: list[bytes]) -> None:
    held.extend(bytes(1000) + bytes([i % 256]) for i in range(100))


def test_format_traces_says_which_line_a_daemon_grew_by(tmp_path: Path) -> None:
    held: list[bytes] = []
    tracemalloc.start(4)
    try:
        tracemalloc.take_snapshot().dump(str(tmp_path / "1.snap"))
        _grow(held)
        tracemalloc.take_snapshot().dump(str(tmp_path / "2.snap"))
    finally:
        tracemalloc.stop()
    grown = format_traces(str(tmp_path / "1.snap"), str(tmp_path / "2.snap"), 3)
    first, top = grown.splitlines()[:2]
    before, after = (float(kb) for kb in first.removesuffix(" KB").split(" -> "))
    assert after - before > 90  # 100 KB held, less what the first snapshot held
    assert "test_bench_cow.py" in top
    gained = re.search(r"size=[\d.]+ KiB \(\+([\d.]+) KiB\)", top)
    assert gained is not None and float(gained.group(1)) > 90
    alone = format_traces(str(tmp_path / "2.snap"), None, 3)
    assert "test_bench_cow.py" in alone.splitlines()[1]


def test_copy_tally_charges_each_growth_to_who_ran_meanwhile() -> None:
    tally = CopyTally()
    for kb, owner in [(100, "x"), (100, "a"), (108, "a"), (112, "b"), (110, "b"), (116, "a")]:
        tally.reading(kb, owner)
    assert tally.kb == {FORK: 100, "a": 14, "b": 2}
    assert tally.last == 116


def test_code_label_names_our_functions_by_tree_line_and_qualname() -> None:
    from shim.boot import template

    code = template._take_environment.__code__
    assert code_label(code) == f"shim/boot/template.py:{code.co_firstlineno} _take_environment"
    assert code_label("(elsewhere)") == "(elsewhere)"


def test_format_copies_averages_functions_over_daemons(tmp_path: Path) -> None:
    import json

    files = []
    for n, (kb, imported) in enumerate([({"f": 100, "g": 10}, ["m"]), ({"f": 200}, [])]):
        path = tmp_path / f"{n}.copies.json"
        path.write_text(json.dumps({"private_kb": 5000 + n, "kb": kb, "imported": imported}))
        files.append(str(path))
    text = format_copies(files, 5)
    assert "[5000, 5001]" in text
    assert "imported after the freeze: m" in text
    rows = [line for line in text.splitlines() if line.startswith("| 1") or line.startswith("| 5")]
    assert rows == ["| 150 | f |", "| 5 | g |"]


def test_format_hotcode_keeps_what_every_daemon_ran_in_the_first_ones_order() -> None:
    text = format_hotcode([["a:f", "b:C.m", "c:g"], ["c:g", "a:f"], ["a:f", "c:g", "d:h"]], "3.x")
    namespace: dict[str, object] = {}
    exec(text, namespace)
    assert namespace["FUNCTIONS"] == ("a:f", "c:g")
    assert "on Python 3.x" in str(namespace["__doc__"])
