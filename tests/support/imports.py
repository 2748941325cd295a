"""What a fresh interpreter imports: start-up cost is paid once per container."""

from __future__ import annotations

import subprocess
import sys


def printed_by_isolated(code: str) -> set[str]:
    """The words ``code`` prints when run by a fresh ``python -I -S`` (no site, no
    environment): the module names it lists."""
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())
