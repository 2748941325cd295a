"""The user's terminal during a foreground `run -t` / `exec -t` / `attach`."""

from __future__ import annotations

import contextlib
import os
import termios
import tty
from collections.abc import Iterator


def terminal_size(fd: int) -> tuple[int, int]:
    """(columns, rows); (0, 0) when fd is not a terminal."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 0, 0
    return size.columns, size.lines


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Raw while the container owns the screen; always restored, even on errors."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
