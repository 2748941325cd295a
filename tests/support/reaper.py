"""A real `shim.reaper.Reaper` on the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from shim.reaper import Reaper


@contextlib.asynccontextmanager
async def installed_reaper() -> AsyncIterator[Reaper]:
    """A Reaper installed on the running loop, uninstalled on the way out."""
    r = Reaper()
    r.install(asyncio.get_running_loop())
    try:
        yield r
    finally:
        r.uninstall()
