"""Routing reaped pids to the processes they belong to.

The reaper hands us every container pid it collects. A pid is only known once runc has
written its pid file, and the process may already be dead by then (``true`` exits in
microseconds), so exits of unknown pids are kept while any start is in flight and
matched when the starter learns its pid. Unknown pids outside such a window are
reparented grandchildren and the like: nobody waits for them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["Exit", "ExitRouter", "ExitTarget", "StartWindow"]


@dataclass(frozen=True)
class Exit:
    pid: int
    status: int
    # The shim's own clock when it reaped the pid: the reference reports processing time.
    at_ns: int


class ExitTarget(Protocol):
    def reaped(self, exit: Exit) -> None: ...


@dataclass(eq=False)
class StartWindow:
    """Exits of not-yet-known pids seen while one Create/Start/exec-start runs."""

    exits: dict[int, Exit] = field(default_factory=dict)


class ExitRouter:
    def __init__(self) -> None:
        self._targets: dict[int, ExitTarget] = {}
        self._windows: set[StartWindow] = set()

    def on_reaped(self, pid: int, status: int) -> None:
        """Reaper subscription callback; runs on the event loop, must not block."""
        exit = Exit(pid, status, time.time_ns())
        target = self._targets.pop(pid, None)
        if target is not None:
            target.reaped(exit)
            return
        for window in self._windows:
            window.exits[pid] = exit

    @contextmanager
    def window(self) -> Iterator[StartWindow]:
        window = StartWindow()
        self._windows.add(window)
        try:
            yield window
        finally:
            self._windows.discard(window)

    def register(self, pid: int, target: ExitTarget, window: StartWindow | None) -> Exit | None:
        """Attach ``pid`` to ``target``; returns its exit instead if it already happened."""
        if window is not None:
            early = window.exits.pop(pid, None)
            if early is not None:
                return early
        self._targets[pid] = target
        return None

    def unregister(self, pid: int, target: ExitTarget) -> None:
        if self._targets.get(pid) is target:
            del self._targets[pid]
