"""Per-connection ttrpc state machines, sans-IO (spec ttrpc.md §6 server, §7 client).

Both follow h11's shape: hand in received bytes with ``receive_data()``, pull events with
``next_event()`` until it returns ``None``, and write whatever bytes the methods return.
No sockets, no tasks, no clocks: the asyncio layers in ``server.py`` / ``client.py`` own
those.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, Generic, NamedTuple, Protocol, TypeVar

from google.protobuf.message import DecodeError, Message

from protocol.ttrpc.frame import (
    MAX_MESSAGE_SIZE,
    MAX_STREAM_ID,
    Event,
    Frame,
    FrameDecoder,
    MessageType,
    OversizedFrame,
    encode_frame,
    oversize_message,
)
from protocol.ttrpc.messages import (
    MessageDecodeError,
    RequestMessage,
    ResponseMessage,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from protocol.ttrpc.status import Code, ConnectionClosedError, TtrpcError

__all__ = [
    "CallCompleted",
    "CallFailed",
    "CallReceived",
    "ClientConnection",
    "ClientEvent",
    "ErrorReply",
    "FrameIgnored",
    "LateResponse",
    "MethodLike",
    "ServerConnection",
    "ServerEvent",
    "UnknownStream",
    "metadata_from_pairs",
]

# Verbatim Go messages (spec §6); peers and tests compare them.
MSG_EVEN_STREAM: Final = "StreamID must be odd for client initiated streams"
MSG_STREAM_REUSED: Final = "StreamID cannot be re-used and must increment"
MSG_STREAM_INACTIVE: Final = "StreamID is no longer active"
MSG_NIL_RESULT: Final = "ttrpc: marshal called with nil"

# How many timed-out/cancelled stream ids the client remembers, so a late answer is
# logged as "late" rather than "unknown". Bounded: a server that never answers must
# not make the client grow.
ABANDONED_MEMORY: Final = 1024


class MethodLike(Protocol):
    """What the server state machine needs to know about a registered method."""

    @property
    def request_type(self) -> type[Message]: ...


M = TypeVar("M", bound=MethodLike)


def metadata_from_pairs(pairs: Iterable[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    """Group wire metadata by lowercased key, keeping every value in wire order."""
    md: dict[str, list[str]] = {}
    for key, value in pairs:
        md.setdefault(key.lower(), []).append(value)
    return {k: tuple(v) for k, v in md.items()}


# ---------------------------------------------------------------------------- server


class CallReceived(NamedTuple, Generic[M]):
    """A valid request for a registered method: run the handler, then ``finish_call``."""

    stream_id: int
    service: str
    method_name: str
    method: M
    request: Message
    timeout_nano: int
    metadata: Mapping[str, Sequence[str]]


class ErrorReply(NamedTuple):
    """The frame was refused; write ``data`` (a whole Response frame) to the peer."""

    stream_id: int
    code: Code
    message: str
    data: bytes


class FrameIgnored(NamedTuple):
    """A frame that needs no answer (a non-Request type, kept for forward compatibility)."""

    stream_id: int
    type: int


ServerEvent = CallReceived[M] | ErrorReply | FrameIgnored


class ServerConnection(Generic[M]):
    """Server side of one connection.

    ``services`` maps service name -> method name -> method; it is read at each request,
    so registering later is seen by existing connections.

    ``strict_stream_ids=False`` (default) behaves like Go ttrpc 1.1: any odd id is
    accepted, even a reused one. ``True`` adds ttrpc 1.2's rules: every Request id must
    be greater than the previous one, the odd-id check applies to every frame type
    before anything else, and Data frames (no streams exist here) are answered with
    "StreamID is no longer active".
    """

    def __init__(
        self,
        services: Mapping[str, Mapping[str, M]],
        *,
        strict_stream_ids: bool = False,
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> None:
        self._services = services
        self.strict_stream_ids = strict_stream_ids
        self.max_message_size = max_message_size
        self._decoder = FrameDecoder(max_message_size)
        self._last_request_id = 0
        # stream id -> number of live calls on it (lenient mode allows reuse).
        self._in_flight: dict[int, int] = {}
        self._in_flight_total = 0
        self.peer_closed = False
        # Every complete frame, oversized ones included: lets the server tell a new
        # partial frame from the one it was already timing.
        self.frames_received = 0

    @property
    def in_flight(self) -> int:
        """Calls handed out by ``next_event`` and not yet finished."""
        return self._in_flight_total

    @property
    def mid_frame(self) -> bool:
        """Received bytes not yet turned into events; once ``next_event`` returned None,
        that is the start of a frame still incomplete (or an oversized one being skipped)."""
        return not self._decoder.at_boundary

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.peer_closed:
            return
        self._decoder.feed(data)

    def receive_eof(self) -> bool:
        """The peer closed. No further calls are produced (their responses could not be
        delivered); returns False when the stream ended inside a frame."""
        self.peer_closed = True
        clean = self._decoder.at_boundary
        self._decoder = FrameDecoder(self.max_message_size)
        self._decoder.close()
        return clean

    def next_event(self) -> ServerEvent[M] | None:
        while not self.peer_closed:
            ev = self._decoder.next_event()
            if ev is None:
                return None
            self.frames_received += 1
            out = self._handle(ev)
            if out is not None:
                return out
        return None

    def _handle(self, ev: Event) -> ServerEvent[M] | None:
        if isinstance(ev, OversizedFrame):
            # Answered on the frame's id whatever its type or parity, as Go does.
            return self._error(ev.stream_id, Code.RESOURCE_EXHAUSTED, ev.message)
        frame: Frame = ev
        if self.strict_stream_ids and frame.stream_id % 2 == 0:
            return self._error(frame.stream_id, Code.INVALID_ARGUMENT, MSG_EVEN_STREAM)
        if frame.type != MessageType.REQUEST:
            if self.strict_stream_ids and frame.type == MessageType.DATA:
                return self._error(frame.stream_id, Code.INVALID_ARGUMENT, MSG_STREAM_INACTIVE)
            return FrameIgnored(frame.stream_id, frame.type)
        try:
            req = decode_request(frame.data)
        except MessageDecodeError as exc:
            return self._error(
                frame.stream_id, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}"
            )
        if frame.stream_id % 2 == 0:
            return self._error(frame.stream_id, Code.INVALID_ARGUMENT, MSG_EVEN_STREAM)
        if self.strict_stream_ids:
            if frame.stream_id <= self._last_request_id:
                return self._error(frame.stream_id, Code.INVALID_ARGUMENT, MSG_STREAM_REUSED)
            self._last_request_id = frame.stream_id
        return self._dispatch(frame.stream_id, req)

    def _dispatch(self, stream_id: int, req: RequestMessage) -> ServerEvent[M]:
        methods = self._services.get(req.service)
        if methods is None:
            return self._error(stream_id, Code.UNIMPLEMENTED, f"service {req.service}")
        method = methods.get(req.method)
        if method is None:
            return self._error(stream_id, Code.UNIMPLEMENTED, f"method {req.method}")
        try:
            request = method.request_type.FromString(req.payload)
        except DecodeError as exc:
            detail = str(exc) or type(exc).__name__
            return self._error(
                stream_id, Code.INTERNAL, f"ttrpc: error unmarshalling payload: {detail}"
            )
        self._in_flight[stream_id] = self._in_flight.get(stream_id, 0) + 1
        self._in_flight_total += 1
        return CallReceived(
            stream_id=stream_id,
            service=req.service,
            method_name=req.method,
            method=method,
            request=request,
            timeout_nano=req.timeout_nano,
            metadata=metadata_from_pairs(req.metadata),
        )

    def _error(self, stream_id: int, code: Code, message: str) -> ErrorReply:
        return ErrorReply(stream_id, code, message, self._status_frame(stream_id, code, message))

    def _status_frame(self, stream_id: int, code: Code | int, message: str) -> bytes:
        data = encode_response(ResponseMessage(code=int(code), message=message))
        if len(data) > self.max_message_size:
            # Only a giant handler-provided message gets here; cut it rather than
            # send a frame the peer must refuse. Cut by UTF-8 bytes, not characters: a
            # message of 3-byte characters cut to max/2 characters still overflowed
            # (fuzz finding). The status envelope itself needs at most 23 bytes.
            budget = max(0, self.max_message_size - 32)
            message = message.encode("utf-8", "replace")[:budget].decode("utf-8", "ignore")
            data = encode_response(ResponseMessage(code=int(code), message=message))
        return encode_frame(stream_id, MessageType.RESPONSE, data)

    def _retire(self, stream_id: int) -> None:
        count = self._in_flight.get(stream_id)
        if count is None:
            raise KeyError(f"stream {stream_id} has no call in flight")
        if count == 1:
            del self._in_flight[stream_id]
        else:
            self._in_flight[stream_id] = count - 1
        self._in_flight_total -= 1

    def finish_call(self, stream_id: int, result: Message | None) -> bytes | None:
        """The handler returned ``result``: the Response frame to write, or ``None``
        when the peer is gone and nothing should be written.

        A result too large for one frame is answered with status 8 instead, so the
        connection stays usable. ``None`` as a result is Go's "marshal called with nil".
        """
        # Serialize before retiring: if this raises, the caller can still fail_call.
        payload = None if result is None else result.SerializeToString()
        self._retire(stream_id)
        if self.peer_closed:
            return None
        if payload is None:
            return self._status_frame(stream_id, Code.UNKNOWN, MSG_NIL_RESULT)
        data = encode_response(ResponseMessage(payload=payload))
        if len(data) > self.max_message_size:
            return self._status_frame(
                stream_id,
                Code.RESOURCE_EXHAUSTED,
                oversize_message(len(data), self.max_message_size),
            )
        return encode_frame(stream_id, MessageType.RESPONSE, data)

    def fail_call(self, stream_id: int, code: Code | int, message: str) -> bytes | None:
        """The handler failed: the Response frame to write, or ``None`` (peer gone)."""
        self._retire(stream_id)
        if self.peer_closed:
            return None
        if int(code) == 0:
            # A status of OK with no payload would read as success; never send that
            # for a failure.
            code = Code.UNKNOWN
        return self._status_frame(stream_id, code, message)


# ---------------------------------------------------------------------------- client


class CallCompleted(NamedTuple):
    """The call succeeded; ``payload`` is the serialized output message (maybe empty)."""

    stream_id: int
    payload: bytes


class CallFailed(NamedTuple):
    stream_id: int
    error: TtrpcError


class UnknownStream(NamedTuple):
    """A frame for a stream with no pending call; drop it (and log)."""

    stream_id: int
    type: int


class LateResponse(NamedTuple):
    """The answer to a call that already timed out or was cancelled locally; drop it."""

    stream_id: int


ClientEvent = CallCompleted | CallFailed | UnknownStream | LateResponse


class ClientConnection:
    """Client side of one connection: stream ids 1, 3, 5, … (strictly increasing, so
    both 1.1 and 1.2 servers accept them) and the pending-call bookkeeping."""

    def __init__(self, *, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self._decoder = FrameDecoder(max_message_size)
        self._ids = itertools.count(1, 2)
        self._pending: set[int] = set()
        # Insertion-ordered, so the oldest is evicted first.
        self._abandoned: dict[int, None] = {}
        self.closed = False

    @property
    def pending(self) -> frozenset[int]:
        return frozenset(self._pending)

    def send_request(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout_nano: int = 0,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> tuple[int, bytes]:
        """Register a call and return ``(stream_id, frame bytes to write)``.

        Raises ``TtrpcError(RESOURCE_EXHAUSTED)`` without using an id when the request
        would exceed the frame limit (ttrpc 1.2 refuses such sends locally too), and
        ``ConnectionClosedError`` once the connection is closed.
        """
        if self.closed:
            raise ConnectionClosedError()
        data = encode_request(
            RequestMessage(
                service=service,
                method=method,
                payload=payload,
                timeout_nano=timeout_nano,
                metadata=tuple((k.lower(), v) for k, v in metadata),
            )
        )
        if len(data) > self.max_message_size:
            raise TtrpcError(
                Code.RESOURCE_EXHAUSTED, oversize_message(len(data), self.max_message_size)
            )
        stream_id = next(self._ids)
        if stream_id > MAX_STREAM_ID:
            # Ids must keep increasing; a fresh connection starts again at 1.
            self._ids = itertools.count(MAX_STREAM_ID + 2, 2)
            raise TtrpcError(Code.RESOURCE_EXHAUSTED, "ttrpc: stream ids exhausted")
        self._pending.add(stream_id)
        return stream_id, encode_frame(stream_id, MessageType.REQUEST, data)

    def abandon(self, stream_id: int) -> None:
        """Stop waiting for a call (local timeout or cancellation)."""
        if stream_id in self._pending:
            self._pending.discard(stream_id)
            self._abandoned[stream_id] = None
            if len(self._abandoned) > ABANDONED_MEMORY:
                del self._abandoned[next(iter(self._abandoned))]

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            return
        self._decoder.feed(data)

    def next_event(self) -> ClientEvent | None:
        while True:
            ev = self._decoder.next_event()
            if ev is None:
                return None
            if ev.stream_id not in self._pending:
                if ev.stream_id in self._abandoned:
                    del self._abandoned[ev.stream_id]
                    return LateResponse(ev.stream_id)
                return UnknownStream(ev.stream_id, ev.type)
            self._pending.discard(ev.stream_id)
            return self._complete(ev)

    def _complete(self, ev: Event) -> ClientEvent:
        sid = ev.stream_id
        if isinstance(ev, OversizedFrame):
            return CallFailed(sid, TtrpcError(Code.RESOURCE_EXHAUSTED, ev.message))
        if ev.type != MessageType.RESPONSE:
            return CallFailed(
                sid, TtrpcError(Code.INTERNAL, f"ttrpc: unknown message type {ev.type} received")
            )
        try:
            resp = decode_response(ev.data)
        except MessageDecodeError as exc:
            return CallFailed(
                sid, TtrpcError(Code.INTERNAL, f"ttrpc: unmarshal response error: {exc}")
            )
        if resp.code != 0:
            return CallFailed(sid, TtrpcError(resp.code, resp.message))
        return CallCompleted(sid, resp.payload)

    def close(self) -> list[int]:
        """The connection is gone: returns the ids of every call that must now fail
        with ``ConnectionClosedError``. Idempotent."""
        self.closed = True
        failed = sorted(self._pending)
        self._pending.clear()
        self._abandoned.clear()
        return failed
