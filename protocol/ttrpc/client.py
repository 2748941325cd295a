"""asyncio ttrpc client (spec ttrpc.md §7) on top of ``connection.ClientConnection``.

Many concurrent calls share one connection; answers are routed by stream id, in any
order. Runs on the default loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar, cast

from google.protobuf.message import DecodeError

from protocol.ttrpc.connection import (
    CallCompleted,
    CallFailed,
    ClientConnection,
    LateResponse,
    UnknownStream,
)
from protocol.ttrpc.frame import MAX_MESSAGE_SIZE
from protocol.ttrpc.status import Code, ConnectionClosedError, TtrpcError

if TYPE_CHECKING:
    from protocol.proto.lite import WireMessage

__all__ = ["Client", "Metadata"]

log = logging.getLogger(__name__)

# A generated class or a LiteMessage (protocol.proto.lite): both read and write bytes.
Resp = TypeVar("Resp", bound="WireMessage")

Metadata = Mapping[str, str | Sequence[str]]
"""Call metadata: key -> value, or key -> several values (sent in order)."""

DEADLINE_MESSAGE = "context deadline exceeded"


class Client:
    """One ttrpc connection. Create with ``await Client.connect(path)`` or
    ``await Client.from_socket(sock)``."""

    def __init__(self, protocol: _ClientProtocol) -> None:
        self._proto = protocol

    @classmethod
    async def connect(
        cls,
        path: str,
        *,
        timeout: float | None = None,
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> Client:
        """Connect to a unix socket; a leading NUL in ``path`` means abstract."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, path)
                return await cls.from_socket(sock, max_message_size=max_message_size)
        except BaseException:
            sock.close()
            raise

    @classmethod
    async def from_socket(
        cls, sock: socket.socket, *, max_message_size: int = MAX_MESSAGE_SIZE
    ) -> Client:
        """Wrap an already connected unix stream socket; the client owns it from now on."""
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_unix_connection(
            lambda: _ClientProtocol(max_message_size), sock=sock
        )
        return cls(proto)

    @property
    def closed(self) -> bool:
        return self._proto.closed

    async def call(
        self,
        service: str,
        method: str,
        request: WireMessage,
        response_type: type[Resp],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> Resp:
        """Call ``service``/``method`` and return its decoded answer.

        ``timeout`` (seconds) is sent as the request's deadline and also bounds the local
        wait: when it passes, ``TtrpcError(DEADLINE_EXCEEDED)`` is raised and a late
        answer is dropped. Failures from the server raise ``TtrpcError`` with its code;
        a lost connection raises ``ConnectionClosedError``.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        pairs = _metadata_pairs(metadata)
        payload = request.SerializeToString()
        try:
            async with asyncio.timeout_at(deadline):
                raw = await self._proto.call(service, method, payload, deadline, pairs)
        except TimeoutError:
            raise TtrpcError(Code.DEADLINE_EXCEEDED, DEADLINE_MESSAGE) from None
        try:
            return response_type.FromString(raw)
        except DecodeError as exc:
            raise TtrpcError(
                Code.INTERNAL, f"ttrpc: error unmarshalling response payload: {exc}"
            ) from exc

    def close(self) -> None:
        """Close the connection; every pending call fails with ConnectionClosedError."""
        self._proto.close()

    async def wait_closed(self) -> None:
        await self._proto.lost.wait()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


def _metadata_pairs(metadata: Metadata | None) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    if metadata:
        for key, value in metadata.items():
            if isinstance(value, str):
                pairs.append((key, value))
            else:
                pairs.extend((key, v) for v in value)
    return pairs


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, max_message_size: int) -> None:
        self._sm = ClientConnection(max_message_size=max_message_size)
        self._transport: asyncio.Transport | None = None
        self._waiters: dict[int, asyncio.Future[bytes]] = {}
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.lost = asyncio.Event()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports are not asyncio.Transport subclasses, so no isinstance check.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._sm.receive_data(data)
        while (ev := self._sm.next_event()) is not None:
            if isinstance(ev, CallCompleted):
                self._resolve(ev.stream_id, ev.payload, None)
            elif isinstance(ev, CallFailed):
                self._resolve(ev.stream_id, None, ev.error)
            elif isinstance(ev, LateResponse):
                log.debug("ttrpc: dropping late answer on stream %d", ev.stream_id)
            elif isinstance(ev, UnknownStream):
                log.warning(
                    "ttrpc: dropping frame type %d for unknown stream %d", ev.type, ev.stream_id
                )

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost fails the pending calls

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all()
        self._can_write.set()
        self.lost.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def close(self) -> None:
        self._fail_all()
        if self._transport is not None:
            self._transport.close()

    def _fail_all(self) -> None:
        self.closed = True
        self._sm.close()
        waiters, self._waiters = self._waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(ConnectionClosedError())

    def _resolve(self, stream_id: int, payload: bytes | None, error: TtrpcError | None) -> None:
        fut = self._waiters.pop(stream_id, None)
        if fut is None or fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            assert payload is not None
            fut.set_result(payload)

    async def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        deadline: float | None,
        metadata: list[tuple[str, str]],
    ) -> bytes:
        # A server that stops reading must not make us buffer without bound: wait for
        # the transport to drain below its high-water mark before adding more.
        while not self._can_write.is_set():
            await self._can_write.wait()
        if self.closed or self._transport is None:
            raise ConnectionClosedError()
        loop = asyncio.get_running_loop()
        timeout_nano = 0
        if deadline is not None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            # Never 0: that would mean "no deadline" to the server.
            timeout_nano = max(1, int(remaining * 1e9))
        stream_id, frame = self._sm.send_request(
            service, method, payload, timeout_nano=timeout_nano, metadata=metadata
        )
        fut: asyncio.Future[bytes] = loop.create_future()
        self._waiters[stream_id] = fut
        self._transport.write(frame)
        try:
            return await fut
        finally:
            if not fut.done() or fut.cancelled():
                # Timed out or cancelled: forget the call; its answer, if any, is dropped.
                self._waiters.pop(stream_id, None)
                self._sm.abandon(stream_id)
