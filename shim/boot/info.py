"""What `-info` (containerd 2.2+) reports about the runtime binary pyshim would run.

Builtins and `protocol.wire` only: containerd runs `-info` once per runtime on the first task
create, with the runtime options it would pass to `start` on stdin.
"""

from __future__ import annotations

from protocol import wire

RUNC_OPTIONS_TYPE = "containerd.runc.v1.Options"
BINARY_NAME_FIELD = 6  # containerd.runc.v1.Options.binary_name
DEFAULT_BINARY = "runc"


def features_binary(options: bytes) -> str:
    """The OCI runtime Create would run for these options (a serialized Any, maybe
    empty): runc Options' binary_name, as the Go shim's `-info` uses it, else runc."""
    if not options:
        return DEFAULT_BINARY
    try:
        type_url, value = wire.decode_any(options)
        if type_url.rsplit("/", 1)[-1] == RUNC_OPTIONS_TYPE:
            return wire.string_field(value, BINARY_NAME_FIELD) or DEFAULT_BINARY
    except (ValueError, UnicodeDecodeError):
        pass
    return DEFAULT_BINARY
