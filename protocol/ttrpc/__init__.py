"""ttrpc in Python: a sans-IO codec (``frame``, ``connection``) and asyncio ``Server`` /
``Client`` on top.

Importing this package is cheap: only the status types load eagerly; the server,
client and protobuf-backed modules load on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from protocol.ttrpc.status import Code, ConnectionClosedError, TtrpcError

if TYPE_CHECKING:
    from protocol.ttrpc.client import Client
    from protocol.ttrpc.frame import MAX_MESSAGE_SIZE
    from protocol.ttrpc.server import Method, RequestContext, Server

__all__ = [
    "MAX_MESSAGE_SIZE",
    "Client",
    "Code",
    "ConnectionClosedError",
    "Method",
    "RequestContext",
    "Server",
    "TtrpcError",
]

_LAZY = {
    "Client": "protocol.ttrpc.client",
    "MAX_MESSAGE_SIZE": "protocol.ttrpc.frame",
    "Method": "protocol.ttrpc.server",
    "RequestContext": "protocol.ttrpc.server",
    "Server": "protocol.ttrpc.server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
