"""containerd's socket-address rules (spec shim-cli.md "Socket addresses", events.md).

Two different conventions exist and must not be mixed up:

- shim addresses (what ``start`` prints, what containerd dials): ``unix://<path>`` is a
  filesystem socket; a string with no ``://`` is an *abstract* socket ``"\\0" + string``.
- ``$TTRPC_ADDRESS`` (containerd's own ttrpc socket, for events): a plain filesystem
  path, and we also accept a ``unix://`` prefix.

Returned paths are ready for ``socket.connect``/``bind`` (abstract ones start with NUL).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

__all__ = [
    "TTRPC_ADDRESS_ENV",
    "UNIX_SCHEME",
    "UnsupportedAddressError",
    "dial_path",
    "parse_ttrpc_address",
    "socket_path_for_events",
    "unix_address",
]

UNIX_SCHEME: Final = "unix://"
TTRPC_ADDRESS_ENV: Final = "TTRPC_ADDRESS"


class UnsupportedAddressError(ValueError):
    """An address with a scheme we cannot dial (e.g. ``vsock://``, ``tcp://``)."""


def dial_path(address: str) -> str:
    """The socket path containerd would dial for a shim ``address``."""
    if address.startswith(UNIX_SCHEME):
        path = address[len(UNIX_SCHEME) :]
        if not path:
            raise ValueError(f"empty unix socket path in {address!r}")
        return path
    if "://" in address:
        raise UnsupportedAddressError(f"unsupported address scheme: {address!r}")
    if not address:
        raise ValueError("empty address")
    return "\0" + address


def unix_address(path: str) -> str:
    """The ``unix://`` form of a filesystem socket path (what ``start`` prints)."""
    if path.startswith("\0"):
        raise ValueError("abstract sockets have no unix:// form")
    return UNIX_SCHEME + path


def parse_ttrpc_address(value: str) -> str:
    """The filesystem path of a ``$TTRPC_ADDRESS`` value (plain path or ``unix://``)."""
    path = value[len(UNIX_SCHEME) :] if value.startswith(UNIX_SCHEME) else value
    if "://" in path:
        raise UnsupportedAddressError(f"unsupported TTRPC_ADDRESS: {value!r}")
    if not path:
        raise ValueError(f"empty TTRPC_ADDRESS: {value!r}")
    return path


def socket_path_for_events(environ: Mapping[str, str] | None = None) -> str | None:
    """containerd's ttrpc socket for publishing events, from ``$TTRPC_ADDRESS``;
    ``None`` when unset or empty (then events can only go through the publish binary)."""
    env = os.environ if environ is None else environ
    value = env.get(TTRPC_ADDRESS_ENV, "")
    if not value:
        return None
    return parse_ttrpc_address(value)
