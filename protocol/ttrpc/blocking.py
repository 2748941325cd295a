"""A blocking ttrpc client on ``connection.ClientConnection``: one call at a time over
a blocking unix socket, for short-lived programs (the `pyshim` CLI) whose whole run is
a few calls. It imports neither asyncio nor the asyncio client (together ~30 ms of a
CLI's start here); errors are those of ``client.Client``.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from google.protobuf.message import DecodeError

from protocol.ttrpc.connection import CallCompleted, CallFailed, ClientConnection
from protocol.ttrpc.frame import MAX_MESSAGE_SIZE
from protocol.ttrpc.status import Code, ConnectionClosedError, TtrpcError

if TYPE_CHECKING:
    from protocol.proto.lite import WireMessage

__all__ = ["BlockingClient"]

# A generated class or a LiteMessage (protocol.proto.lite): both read and write bytes.
Resp = TypeVar("Resp", bound="WireMessage")
DEADLINE_MESSAGE = "context deadline exceeded"
RECV_SIZE = 65536


class BlockingClient:
    """One ttrpc connection; ``BlockingClient.connect(path)``."""

    def __init__(self, sock: socket.socket, *, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        sock.setblocking(True)
        self._sock = sock
        self._sm = ClientConnection(max_message_size=max_message_size)

    @classmethod
    def connect(cls, path: str, *, timeout: float | None = None) -> BlockingClient:
        """Connect to a unix socket; a leading NUL in ``path`` means abstract."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    @property
    def closed(self) -> bool:
        return self._sm.closed

    def close(self) -> None:
        self._sm.close()
        self._sock.close()

    def call(
        self,
        service: str,
        method: str,
        request: WireMessage,
        response_type: type[Resp],
        *,
        timeout: float | None = None,
        metadata: dict[str, str] | None = None,
        idle: Callable[[], object] | None = None,
        idle_interval: float = 0.05,
    ) -> Resp:
        """Call ``service``/``method`` and return its decoded answer. While waiting,
        ``idle`` (if given) is called at least every ``idle_interval`` seconds and once
        more after the answer came (a CLI copies a log file that way)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # Never 0 on the wire: that would mean "no deadline" to the server.
        timeout_nano = 0 if timeout is None else max(1, int(timeout * 1e9))
        stream_id, frame = self._sm.send_request(
            service,
            method,
            request.SerializeToString(),
            timeout_nano=timeout_nano,
            metadata=tuple((metadata or {}).items()),
        )
        try:
            self._sock.sendall(frame)
        except OSError:
            self.close()
            raise ConnectionClosedError() from None
        while True:
            while (ev := self._sm.next_event()) is not None:
                if ev.stream_id != stream_id:
                    continue  # only one call is ever in flight: nothing else to route
                if idle is not None:
                    idle()
                if isinstance(ev, CallFailed):
                    raise ev.error
                assert isinstance(ev, CallCompleted)
                try:
                    return response_type.FromString(ev.payload)
                except DecodeError as exc:
                    raise TtrpcError(
                        Code.INTERNAL, f"ttrpc: error unmarshalling response payload: {exc}"
                    ) from exc
            wait = None if idle is None else idle_interval
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._sm.abandon(stream_id)
                    raise TtrpcError(Code.DEADLINE_EXCEEDED, DEADLINE_MESSAGE)
                wait = left if wait is None else min(wait, left)
            readable, _, _ = select.select([self._sock], [], [], wait)
            if idle is not None:
                idle()
            if not readable:
                continue
            try:
                data = self._sock.recv(RECV_SIZE)
            except OSError:
                data = b""
            if not data:
                self.close()
                raise ConnectionClosedError()
            self._sm.receive_data(data)
