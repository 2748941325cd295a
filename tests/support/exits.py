"""Exit statuses of container processes as a Reaper subscription reports them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass(kw_only=True)
class ExitRecorder:
    """Subscribe ``on_exit`` to a Reaper; ``await exit_of(pid)`` for a process's status."""

    exits: dict[int, int] = field(default_factory=dict)
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    def on_exit(self, pid: int, status: int) -> None:
        self.exits[pid] = status
        self.exited.set()

    async def exit_of(self, pid: int, timeout: float = 20.0) -> int:
        async def wait() -> int:
            while pid not in self.exits:
                self.exited.clear()
                await self.exited.wait()
            return self.exits[pid]

        return await asyncio.wait_for(wait(), timeout)
