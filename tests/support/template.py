"""The shim's fork templates (shim/boot/template.py) that a test or benchmark caused.

A template is spawned by the first `start` whose environment names its directory
(`PYSHIM_TEMPLATE_DIR`) and outlives everything else by design, so whoever gave a
run its own template directory stops that directory's templates at the end. Each
template keeps a pre-forked spare (`… template spare`, comm `pyshim-spare`), which
exits by itself when its template is gone; stopping kills it too, by pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from shim.sys.procfs import stat_fields

PROC = Path("/proc")


def _processes(template_dir: Path, spares: bool) -> list[int]:
    want = f"PYSHIM_TEMPLATE_DIR={template_dir}".encode()
    found: list[int] = []
    for entry in os.listdir(PROC):
        if not entry.isdigit():
            continue
        try:
            cmdline = (PROC / entry / "cmdline").read_bytes()
            # By name too: a spare whose command line could not be rewritten.
            comm = (PROC / entry / "comm").read_bytes()
            is_spare = cmdline.endswith(b"\0template\0spare\0") or comm == b"pyshim-spare\n"
            if spares != is_spare or not (is_spare or cmdline.endswith(b"\0template\0")):
                continue
            if want not in (PROC / entry / "environ").read_bytes().split(b"\0"):
                continue
        except OSError:  # gone, or a kernel thread
            continue
        found.append(int(entry))
    return sorted(found)


def template_pids(template_dir: Path) -> list[int]:
    """Live templates (`containerd-shim-pyshim-v1 … template`) serving template_dir.

    A child the template is forking (a spare or a daemon, before it renames itself)
    has the same command line for a moment; a template leads its own session (it is
    spawned with setsid) and is not the child of another: the double fork's middle
    process leads a session too, but its parent is the template.
    """
    candidates = _processes(template_dir, spares=False)
    found: list[int] = []
    for pid in candidates:
        try:
            ppid = int(stat_fields(pid)[1])
            if os.getsid(pid) == pid and ppid not in candidates:
                found.append(pid)
        except (OSError, ValueError, IndexError):
            continue
    return found


def spare_pids(template_dir: Path) -> list[int]:
    """Idle pre-forked daemons of the templates serving template_dir."""
    return _processes(template_dir, spares=True)


def stop_templates(template_dir: Path) -> None:
    """SIGKILL, by pid, every template serving template_dir and its spare (they hold
    no state)."""
    for pid in template_pids(template_dir) + spare_pids(template_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
