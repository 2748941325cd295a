"""Parsers and page accounting of bench/cow.py (copy-on-write of forked shims)."""

from __future__ import annotations

import struct

import pytest

from bench.cow import (
    FREE,
    PAGE,
    PFN_MASK,
    PM_EXCLUSIVE,
    PM_PRESENT,
    ObjectRecord,
    RegionCount,
    attribute,
    classify_pages,
    decode_pagemap,
    parse_object_dump,
    parse_smaps,
    region_names,
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
