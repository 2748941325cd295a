"""The shim's fork templates (shim/template.py) that a test or benchmark caused.

A template is spawned by the first `start` whose environment names its directory
(`PYSHIM_TEMPLATE_DIR`) and outlives everything else by design, so whoever gave a
run its own template directory stops that directory's templates at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

PROC = Path("/proc")


def template_pids(template_dir: Path) -> list[int]:
    """Live templates (`containerd-shim-pyshim-v1 … template`) serving template_dir."""
    want = f"PYSHIM_TEMPLATE_DIR={template_dir}".encode()
    found: list[int] = []
    for entry in os.listdir(PROC):
        if not entry.isdigit():
            continue
        try:
            if not (PROC / entry / "cmdline").read_bytes().endswith(b"\0template\0"):
                continue
            if want not in (PROC / entry / "environ").read_bytes().split(b"\0"):
                continue
        except OSError:  # gone, or a kernel thread
            continue
        found.append(int(entry))
    return sorted(found)


def stop_templates(template_dir: Path) -> None:
    """SIGKILL, by pid, every template serving template_dir (they hold no state)."""
    for pid in template_pids(template_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
