"""`ctr events` of a private containerd, read in the background."""

from __future__ import annotations

import asyncio
import subprocess
import threading

from tests.support.containerd import Containerd


class CtrEvents:
    """`ctr events` in the background; lines collected by a reader thread.

    It gives no readiness signal: callers wait for a probe of their own to show up.
    """

    def __init__(self, ctrd: Containerd) -> None:
        self.proc = subprocess.Popen(
            [ctrd.host.ctr, "--address", ctrd.address, "events"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def matching(self, *needles: str) -> list[str]:
        return [ln for ln in list(self.lines) if all(n in ln for n in needles)]

    async def wait_for(self, *needles: str, timeout: float = 15.0) -> str:
        async with asyncio.timeout(timeout):
            while True:
                found = self.matching(*needles)
                if found:
                    return found[0]
                await asyncio.sleep(0.05)

    def topics(self, container_id: str) -> list[str]:
        """Topics of the task events of one container, in arrival order."""
        needle = f'"container_id":"{container_id}"'
        return [ln.split()[5] for ln in list(self.lines) if "/tasks/" in ln and needle in ln]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
