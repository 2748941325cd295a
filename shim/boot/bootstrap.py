"""containerd 2.3+'s bootstrap answer to `start` (docs/containerd-2.md).

containerd 2.3 writes a `BootstrapParams` on `start`'s stdin and reads the
answer as a serialized `BootstrapResult` first (the form its own Go shim
prints), then as JSON, then as a bare address. Only a containerd that sent
`BootstrapParams` is answered this way: older ones (1.6 reads a bare address
only) get the address. Builtins and `protocol.wire` only: this runs in every `start`.
"""

from __future__ import annotations

from protocol import wire

# containerd.task.v3.Task: the task API version this shim serves (beside v2).
TASK_API_VERSION = 3
PROTOCOL = "ttrpc"


def result(address: str) -> bytes:
    """A serialized containerd.runtime.bootstrap.v1.BootstrapResult for ``address``."""
    return (
        wire.field_varint(1, TASK_API_VERSION)
        + wire.field_str(2, address)
        + wire.field_str(3, PROTOCOL)
    )


def answer(address: str, *, bootstrap: bool) -> bytes:
    """What `start` prints: the bootstrap result when containerd sent BootstrapParams
    (and so reads one), else the bare address every containerd understands."""
    return result(address) if bootstrap else address.encode()
