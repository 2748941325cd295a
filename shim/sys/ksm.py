"""A forked daemon's memory offered to the kernel's same-page merging (KSM).

Daemons forked from one template (shim.boot.prefork) run the same code from the same
state, so most pages they copy are byte-identical from one daemon to the next; where
the node runs ksmd, marking them MADV_MERGEABLE folds those copies back into one
page. The task service calls `started()` after its first init Start reply.
"""

from __future__ import annotations

import contextlib

MADV_MERGEABLE = 12  # <asm-generic/mman-common.h>


def private_writable(maps: bytes) -> list[tuple[int, int]]:
    """The [start, end) ranges of the private writable mappings in /proc/<pid>/maps
    text: the only ones whose pages a fork copies and KSM can merge."""
    ranges = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=2)
        if len(fields) < 2 or fields[1][1:2] != b"w" or fields[1][3:4] != b"p":
            continue
        start, _, end = fields[0].partition(b"-")
        ranges.append((int(start, 16), int(end, 16)))
    return ranges


def mark_mergeable() -> int:
    """Mark this process's private writable mappings mergeable (MADV_MERGEABLE); the
    bytes marked.

    The mark belongs to each mapping: forked daemons inherit it and execve drops it, so
    runc and the container's processes never have it (PR_SET_MEMORY_MERGE would be
    simpler, but since Linux 6.8 an exec keeps that one). Nothing is merged unless the
    node runs ksmd (/sys/kernel/mm/ksm/run); mappings the kernel refuses, or a kernel
    without KSM, leave everything as it was.
    """
    from shim.sys import syscalls

    with open("/proc/self/maps", "rb") as maps:
        ranges = private_writable(maps.read())
    marked = 0
    for start, end in ranges:
        try:
            syscalls.madvise(start, end - start, MADV_MERGEABLE)
        except OSError:
            continue
        marked += end - start
    return marked


_mark_pending = False


def mark_after_start() -> None:
    """Called by a daemon the template forked: `started()` will mark it mergeable."""
    global _mark_pending
    _mark_pending = True


def started() -> None:
    """A container has started: mark this daemon's memory mergeable, once, if it was
    forked from the template. By then the daemon has copied what it will (bench/cow.py:
    the same after 10 s idle), and the ~0.5 ms this takes is spent after the Start
    reply, not before. Re-executed daemons are not marked: their address layouts differ,
    so their pages are not byte-identical."""
    global _mark_pending
    if _mark_pending:
        _mark_pending = False
        # /proc unreadable: nothing was marked, and nothing else changes.
        with contextlib.suppress(OSError):
            mark_mergeable()
