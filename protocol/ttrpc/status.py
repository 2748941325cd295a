"""gRPC status codes as ttrpc carries them, and the exceptions that hold one.

Kept free of protobuf and asyncio imports: every shim process imports this.
"""

from __future__ import annotations

import enum

__all__ = ["CLOSED_MESSAGE", "Code", "ConnectionClosedError", "TtrpcError"]

# Go's ttrpc.ErrClosed text; containerd matches on the "closed" meaning, and users see it.
CLOSED_MESSAGE = "ttrpc: closed"


class Code(enum.IntEnum):
    """gRPC status codes (google.rpc.Code); the numbers are the wire values."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TtrpcError(Exception):
    """An error carrying a status: raised by handlers to choose the reply, and by the client.

    ``code`` is a plain ``int`` when a peer sent a value outside 0..16 (we keep it rather
    than lose it), otherwise a ``Code``.
    """

    code: Code | int
    message: str

    def __init__(self, code: Code | int, message: str) -> None:
        super().__init__(code, message)
        try:
            self.code = Code(code)
        except ValueError:
            self.code = int(code)
        self.message = message

    def __str__(self) -> str:
        name = self.code.name if isinstance(self.code, Code) else str(self.code)
        return f"{name}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


class ConnectionClosedError(TtrpcError):
    """The connection went away: every call still waiting on it fails with this.

    The code is UNAVAILABLE (what gRPC uses for a lost transport); the message is Go's
    ``ttrpc: closed`` so logs read the same as with the Go client.
    """

    def __init__(self, message: str = CLOSED_MESSAGE) -> None:
        super().__init__(Code.UNAVAILABLE, message)
