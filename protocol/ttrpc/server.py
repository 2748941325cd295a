"""asyncio ttrpc server (spec ttrpc.md §6) on top of ``connection.ServerConnection``.

One ``asyncio.Protocol`` per accepted connection; one task per request, each answered
as it finishes. Runs on the default loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, Generic, NamedTuple, TypeVar, cast

from google.protobuf.message import Message

from protocol.ttrpc.connection import CallReceived, ErrorReply, FrameIgnored, ServerConnection
from protocol.ttrpc.frame import MAX_MESSAGE_SIZE
from protocol.ttrpc.status import Code, TtrpcError

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_PARTIAL_FRAME_TIMEOUT",
    "DEFAULT_WRITE_BUFFER_HIGH",
    "DEFAULT_WRITE_BUFFER_LOW",
    "Method",
    "PeerCheck",
    "RequestContext",
    "Server",
    "root_or_same_user_peer_check",
    "same_user_peer_check",
]

log = logging.getLogger(__name__)

# Accepted connections beyond this are closed at once, nothing sent. containerd opens a
# handful per shim; the cap only stops a runaway local client from exhausting fds.
DEFAULT_MAX_CONNECTIONS: Final = 128
# Per connection. At the limit the server stops reading that connection (the peer's
# sends block in the kernel) until a call finishes; nothing is refused. High because
# containerd parks one long `Wait` per process on a single connection and the `Kill`
# that ends them must still get through.
DEFAULT_MAX_IN_FLIGHT: Final = 1024
# Per-connection write buffer (bytes queued beyond the kernel's). Above HIGH the server
# stops reading from that peer, so a peer that never reads cannot make it buffer more
# than HIGH plus the answers of calls already running; reading resumes below LOW.
DEFAULT_WRITE_BUFFER_HIGH: Final = 1 << 20
DEFAULT_WRITE_BUFFER_LOW: Final = 256 << 10
# Seconds a connection may hold part of a frame while we wait for nothing else (no call
# in flight, reading not paused by us) before it is closed: otherwise peers that stall
# mid-frame keep their connection slots forever and, 128 of them, lock containerd out.
# Counted from the frame's first byte, not reset by further bytes of the same frame, so
# trickling one byte at a time does not extend it. Real peers write a frame in one go;
# even a 4 MiB frame over a unix socket takes milliseconds.
DEFAULT_PARTIAL_FRAME_TIMEOUT: Final = 30.0

_PEERCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)

PeerCheck = Callable[[int, int, int], bool]
"""``(pid, uid, gid)`` of the peer (SO_PEERCRED) -> accept?"""


def same_user_peer_check(pid: int, uid: int, gid: int) -> bool:
    """Go ttrpc's check: the peer's uid and gid equal our effective uid and gid."""
    return uid == os.geteuid() and gid == os.getegid()


def root_or_same_user_peer_check(pid: int, uid: int, gid: int) -> bool:
    """Go ttrpc's check, and root is always let in (it can reach the socket anyway)."""
    return uid == 0 or same_user_peer_check(pid, uid, gid)


class RequestContext(NamedTuple):
    service: str
    method: str
    # Lowercased keys; every value of a repeated key, in wire order.
    metadata: Mapping[str, Sequence[str]]
    # Event-loop time (``loop.time()``) after which the handler is cancelled; None = none.
    deadline: float | None
    stream_id: int


class Method(NamedTuple, Generic[Req, Resp]):
    request_type: type[Req]
    handler: Callable[[RequestContext, Req], Awaitable[Resp]]


class Server:
    """A ttrpc server. ``register`` services, then ``serve_*`` on one or more sockets.

    ``peer_check`` is called with the peer's (pid, uid, gid) for each connection; a
    refusal (or an exception) closes it with nothing sent. ``strict_stream_ids`` enables
    ttrpc 1.2's increasing-id rule (default: lenient like 1.1). See the DEFAULT_*
    constants for the limits.
    """

    def __init__(
        self,
        *,
        peer_check: PeerCheck | None = None,
        strict_stream_ids: bool = False,
        max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
        max_in_flight: int | None = DEFAULT_MAX_IN_FLIGHT,
        write_buffer_high: int = DEFAULT_WRITE_BUFFER_HIGH,
        write_buffer_low: int = DEFAULT_WRITE_BUFFER_LOW,
        max_message_size: int = MAX_MESSAGE_SIZE,
        partial_frame_timeout: float | None = DEFAULT_PARTIAL_FRAME_TIMEOUT,
    ) -> None:
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if partial_frame_timeout is not None and partial_frame_timeout <= 0:
            raise ValueError("partial_frame_timeout must be > 0 (or None for no bound)")
        if not 0 <= write_buffer_low <= write_buffer_high:
            raise ValueError("need 0 <= write_buffer_low <= write_buffer_high")
        self.peer_check = peer_check
        self.strict_stream_ids = strict_stream_ids
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight
        self.write_buffer_high = write_buffer_high
        self.write_buffer_low = write_buffer_low
        self.max_message_size = max_message_size
        self.partial_frame_timeout = partial_frame_timeout
        self._services: dict[str, dict[str, Method[Any, Any]]] = {}
        self._listeners: list[asyncio.AbstractServer] = []
        self._conns: set[_ServerProtocol] = set()
        # Every running handler, including those whose connection is already gone,
        # so close() can cancel them all.
        self._tasks: set[asyncio.Task[None]] = set()
        self._shutting_down = False
        self._closed = False
        self._idle: asyncio.Event | None = None
        self._done: asyncio.Event | None = None

    # ------------------------------------------------------------------ registration

    def register(self, service: str, methods: Mapping[str, Method[Any, Any]]) -> None:
        if service in self._services:
            raise ValueError(f"service {service} already registered")
        self._services[service] = dict(methods)

    @property
    def services(self) -> Mapping[str, Mapping[str, Method[Any, Any]]]:
        return self._services

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    # ------------------------------------------------------------------ listening

    async def serve_socket(self, sock: socket.socket) -> None:
        """Serve an already bound and listening unix socket (e.g. the shim's fd 3).
        The server owns it from now on and closes it on shutdown."""
        if self._closed or self._shutting_down:
            raise RuntimeError("server is closed")
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        if self._done is None:
            self._done = asyncio.Event()
        listener = await loop.create_unix_server(lambda: _ServerProtocol(self), sock=sock)
        self._listeners.append(listener)

    async def serve_path(self, path: str, *, backlog: int = socket.SOMAXCONN) -> None:
        """Bind and serve a filesystem socket (a path starting with NUL is abstract)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            sock.listen(backlog)
            await self.serve_socket(sock)
        except BaseException:
            sock.close()
            raise

    async def serve_abstract(self, name: str, *, backlog: int = socket.SOMAXCONN) -> None:
        """Bind and serve the abstract socket ``name`` (without the leading NUL)."""
        await self.serve_path("\0" + name, backlog=backlog)

    # ------------------------------------------------------------------ stopping

    async def shutdown(self, timeout: float | None = None) -> bool:
        """Stop listening, then close each connection as soon as it has no call in
        flight. After ``timeout`` seconds whatever remains is closed by force.

        Returns True when every connection closed gracefully.
        """
        self._stop_listening()
        self._shutting_down = True
        if self._idle is None:
            self._idle = asyncio.Event()
        for conn in list(self._conns):
            conn.begin_shutdown()
        self._check_idle()
        graceful = True
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            graceful = False
            log.warning(
                "ttrpc server shutdown timed out; closing %d connection(s)", len(self._conns)
            )
        self.close()
        return graceful

    def close(self) -> None:
        """Close everything now: listeners, connections, and running handlers (cancelled)."""
        self._closed = True
        self._shutting_down = True
        self._stop_listening()
        for conn in list(self._conns):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._done is not None:
            self._done.set()

    async def wait_closed(self) -> None:
        """Until ``close()`` (or ``shutdown()``) has run."""
        if self._done is None:
            self._done = asyncio.Event()
        if self._closed:
            return
        await self._done.wait()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def _stop_listening(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()

    # ------------------------------------------------------------------ bookkeeping

    def _admit(self, conn: _ServerProtocol, transport: asyncio.Transport) -> bool:
        if self._shutting_down:
            return False
        if self.max_connections is not None and len(self._conns) >= self.max_connections:
            log.warning("ttrpc: refusing connection: %d connections open", len(self._conns))
            return False
        if self.peer_check is not None:
            cred = _peer_cred(transport)
            try:
                ok = cred is not None and self.peer_check(*cred)
            except Exception:
                log.exception("ttrpc: peer check failed")
                ok = False
            if not ok:
                log.warning("ttrpc: refusing connection from peer (pid, uid, gid)=%s", cred)
                return False
        self._conns.add(conn)
        return True

    def _forget(self, conn: _ServerProtocol) -> None:
        self._conns.discard(conn)
        self._check_idle()

    def _check_idle(self) -> None:
        if self._shutting_down and self._idle is not None and not self._conns:
            self._idle.set()


def _peer_cred(transport: asyncio.Transport) -> tuple[int, int, int] | None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        log.exception("ttrpc: SO_PEERCRED failed")
        return None
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


class _ServerProtocol(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self._server = server
        self._sm: ServerConnection[Method[Any, Any]] = ServerConnection(
            server.services,
            strict_stream_ids=server.strict_stream_ids,
            max_message_size=server.max_message_size,
        )
        self._transport: asyncio.Transport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Why reading is paused: "calls" (in-flight limit) and/or "writes" (backpressure).
        self._pause: set[str] = set()
        self._reading_paused = False
        self._closing = False
        self._closing_when_idle = False
        self._lost = False
        # Armed only while a partial frame waits on the peer alone, so an idle
        # connection costs no wake-ups; _stall_frame is the frame count it was armed at.
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stall_frame = 0

    # ---------------------------------------------------------------- transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports are not asyncio.Transport subclasses, so no isinstance check.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        if not self._server._admit(self, transport):
            self._closing = True
            transport.abort()
            return
        transport.set_write_buffer_limits(
            high=self._server.write_buffer_high, low=self._server.write_buffer_low
        )

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._sm.receive_data(data)
        self._pump()
        self._watch_stall()

    def eof_received(self) -> bool | None:
        if not self._sm.receive_eof():
            log.debug("ttrpc: peer closed inside a frame")
        # Returning a false value closes the transport; answers still being computed
        # are dropped (the peer cannot read them).
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._closing = True
        self._cancel_stall()
        self._sm.receive_eof()
        self._server._forget(self)

    def pause_writing(self) -> None:
        self._set_pause("writes", True)

    def resume_writing(self) -> None:
        self._set_pause("writes", False)

    # ---------------------------------------------------------------- control

    def begin_shutdown(self) -> None:
        """Close once no call is in flight (checked again whenever a call finishes)."""
        self._closing_when_idle = True
        self._maybe_close_idle()

    def abort(self) -> None:
        self._closing = True
        self._cancel_stall()
        for task in list(self._tasks):
            task.cancel()
        if self._transport is not None:
            self._transport.abort()

    def _maybe_close_idle(self) -> None:
        if self._closing_when_idle and self._sm.in_flight == 0 and not self._closing:
            self._closing = True
            assert self._transport is not None
            self._transport.close()

    def _set_pause(self, reason: str, on: bool) -> None:
        if on:
            self._pause.add(reason)
        else:
            self._pause.discard(reason)
        if self._transport is None or self._lost:
            return
        if self._pause and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
        elif not self._pause and self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()
            # Complete frames may already sit in the decoder from the last read.
            self._pump()
        self._watch_stall()

    def _watch_stall(self) -> None:
        timeout = self._server.partial_frame_timeout
        sm = self._sm
        waiting_on_peer = (
            timeout is not None
            and not self._closing
            and not self._pause
            and sm.in_flight == 0
            and sm.mid_frame
        )
        if not waiting_on_peer:
            self._cancel_stall()
            return
        if self._stall_timer is not None and self._stall_frame == sm.frames_received:
            return  # the same frame is still incomplete: its deadline stands
        assert timeout is not None
        self._cancel_stall()
        self._stall_frame = sm.frames_received
        self._stall_timer = asyncio.get_running_loop().call_later(timeout, self._stalled)

    def _cancel_stall(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _stalled(self) -> None:
        self._stall_timer = None
        if self._closing or self._transport is None:
            return
        log.warning(
            "ttrpc: closing connection: peer stalled inside a frame for %gs with no call in flight",
            self._server.partial_frame_timeout,
        )
        self._closing = True
        # abort, not close: a peer that stopped writing may not read either, and close()
        # would wait on it to flush our queued answers.
        self._transport.abort()

    def _pump(self) -> None:
        limit = self._server.max_in_flight
        while not self._pause and not self._closing:
            if limit is not None and self._sm.in_flight >= limit:
                self._set_pause("calls", True)
                return
            ev = self._sm.next_event()
            if ev is None:
                return
            if isinstance(ev, CallReceived):
                self._start(ev)
            elif isinstance(ev, ErrorReply):
                log.debug("ttrpc: stream %d refused: %s %s", ev.stream_id, ev.code.name, ev.message)
                self._write(ev.data)
            elif isinstance(ev, FrameIgnored):
                log.debug("ttrpc: ignoring frame type %d on stream %d", ev.type, ev.stream_id)

    def _write(self, data: bytes) -> None:
        # transport.write queues the whole frame in one call, so frames never interleave.
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    # ---------------------------------------------------------------- calls

    def _start(self, call: CallReceived[Method[Any, Any]]) -> None:
        loop = asyncio.get_running_loop()
        deadline = None
        if call.timeout_nano != 0:
            deadline = loop.time() + call.timeout_nano / 1e9
        ctx = RequestContext(
            service=call.service,
            method=call.method_name,
            metadata=call.metadata,
            deadline=deadline,
            stream_id=call.stream_id,
        )
        task = loop.create_task(self._run(call, ctx))
        self._tasks.add(task)
        self._server._tasks.add(task)
        task.add_done_callback(self._call_done)

    async def _run(self, call: CallReceived[Method[Any, Any]], ctx: RequestContext) -> None:
        sid = call.stream_id
        try:
            async with asyncio.timeout_at(ctx.deadline):
                result = await call.method.handler(ctx, call.request)
        except TtrpcError as exc:
            out = self._sm.fail_call(sid, exc.code, exc.message)
        except TimeoutError as exc:
            out = self._sm.fail_call(
                sid, Code.DEADLINE_EXCEEDED, str(exc) or "context deadline exceeded"
            )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Cancelled by us (forced close): nobody to answer.
                self._sm.fail_call(sid, Code.CANCELLED, "context canceled")
                raise
            out = self._sm.fail_call(sid, Code.CANCELLED, "context canceled")
        except Exception as exc:
            log.exception("ttrpc: %s/%s handler failed", call.service, call.method_name)
            out = self._sm.fail_call(sid, Code.UNKNOWN, str(exc) or type(exc).__name__)
        else:
            try:
                out = self._sm.finish_call(sid, result)
            except Exception as exc:
                log.exception("ttrpc: %s/%s bad result", call.service, call.method_name)
                out = self._sm.fail_call(sid, Code.UNKNOWN, str(exc) or type(exc).__name__)
        if out is not None:
            self._write(out)

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._server._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("ttrpc: call task failed", exc_info=exc)
        if "calls" in self._pause:
            self._set_pause("calls", False)
        self._maybe_close_idle()
        self._watch_stall()
