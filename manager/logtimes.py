"""Reading a log's index (manager.logindex writes it): when each line was written, for
`pyshim logs -t` and `--since`. Apart from the writer so that the CLI imports neither
asyncio nor pathlib for it."""

from __future__ import annotations

import bisect
import contextlib
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from os import PathLike

INDEX_SUFFIX = ".idx"


def index_path(log_path: str | PathLike[str]) -> str:
    return os.fspath(log_path) + INDEX_SUFFIX


def read_index(path: str | PathLike[str]) -> list[tuple[int, int]]:
    """(size, ns) pairs, sizes increasing; a torn last line is left out."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return []
    out: list[tuple[int, int]] = []
    for line in text.split("\n")[:-1]:
        size_s, _, ns_s = line.partition(" ")
        with contextlib.suppress(ValueError):
            size, ns = int(size_s), int(ns_s)
            if not out or size > out[-1][0]:
                out.append((size, ns))
    return out


class LineTimes:
    """The write time of the byte ending at an offset, from a log's index: bytes past
    the index but in the file when it was read get the file's mtime (its last write),
    bytes written since (`logs -f`) the time they are read."""

    def __init__(self, entries: list[tuple[int, int]], size: int, mtime_ns: int) -> None:
        self._sizes = [s for s, _ in entries]
        self._times = [t for _, t in entries]
        self._size = size
        self._mtime = mtime_ns

    @classmethod
    def for_log(cls, log_path: str | PathLike[str]) -> LineTimes:
        entries = read_index(index_path(log_path))
        try:
            st = os.stat(log_path)
        except OSError:
            return cls(entries, 0, 0)
        return cls(entries, st.st_size, st.st_mtime_ns)

    def at(self, end_offset: int) -> int:
        """The time the byte before ``end_offset`` was known written."""
        i = bisect.bisect_left(self._sizes, end_offset)
        if i < len(self._times):
            return self._times[i]
        return self._mtime if end_offset <= self._size else time.time_ns()
