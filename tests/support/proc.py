"""What /proc says about a test's processes."""

from __future__ import annotations

import os
from pathlib import Path


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, state letter) of every process whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append((int(entry), fields[0]))
    return found
