"""Event publisher: one ordered queue, one sender, ttrpc Forward to containerd.

See events.md. Unlike the Go shim, a failing event stays at the head of the
queue while it is retried, so events leave in exactly the order they were
produced (consumers rely on create < start < exit < delete). Exits are on disk
before they are published, so an event dropped after its last attempt loses no
information containerd cannot get back through State/Wait/Delete.

Nothing runs while the queue is empty: the sender task exits and no timer is
armed, so an idle shim never wakes up.

Durable outbox: once a container is attached (its bundle known), each of its events is
appended to its log ``<bundle>/pyshim/outbox.log`` (shim/records/recordlog.py) before it is
queued, and marked done once the Forward was acknowledged. Such an event is never dropped
for a transient failure (containerd or pyshimd down for longer than the reference's
~20 s of retries): it is retried with a capped backoff for as long as the shim lives.
A later shim attaching the same bundle queues what is left there, in order. Receivers
see an event twice if the acknowledgement was lost; pyshimd dedupes exits, containerd
does not (its consumers tolerate duplicate exits).

The log is not fsynced: it is there for a shim that dies (SIGKILL, crash) before
delivering an event, and the page cache outlives any process. A kernel crash or power
loss kills every container and the containerd state those events describe, so an
fsync (~0.1-0.5 ms on the exec and exit paths) would protect nothing anyone could use;
the replay stops at a record such a crash left torn. The exit itself is synced in the
container's exit log (shim.records.state.ExitLog) before it is published.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from protocol.proto import anyutil, timeutil
from protocol.proto.events import forward_pb2
from protocol.ttrpc.address import parse_ttrpc_address
from protocol.ttrpc.client import Client
from protocol.ttrpc.status import Code, ConnectionClosedError, TtrpcError
from shim.reaper import Reaper
from shim.records.recordfile import RecordError, read_regular_file
from shim.records.recordlog import RecordLog
from shim.records.statedir import STATE_DIR_NAME

__all__ = ["EVENTS_SERVICE", "NAMESPACE_METADATA_KEY", "PublishError", "Publisher"]

_log = logging.getLogger("shim.events")

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
FORWARD_METHOD = "Forward"
NAMESPACE_METADATA_KEY = "containerd-namespace-ttrpc"
CALL_TIMEOUT = 5.0
DIAL_TIMEOUT = 5.0
# The Go shim buffers 128; ours may hold more because a failing head blocks the rest.
DEFAULT_MAX_QUEUE = 1024
# Reference: attempt n waits n seconds, dropped after more than 5 retries.
DEFAULT_MAX_ATTEMPTS = 6
DEFAULT_BACKOFF_STEP = 1.0
DEFAULT_BACKOFF_MAX = 5.0
PUBLISH_BINARY_TIMEOUT = 30.0

# containerd answers these for an envelope it will never accept; retrying is useless.
_PERMANENT = frozenset({Code.INVALID_ARGUMENT, Code.UNIMPLEMENTED, Code.PERMISSION_DENIED})


class PublishError(Exception):
    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


OUTBOX_LOG = "outbox.log"
# Where shims before the log kept a file per undelivered event.
LEGACY_OUTBOX_DIR = "outbox"
LEGACY_OUTBOX_SUFFIX = ".pb"


class _Pending:
    __slots__ = ("attempts", "envelope", "outbox", "seq", "topic")

    def __init__(
        self,
        topic: str,
        envelope: forward_pb2.Envelope,
        outbox: RecordLog | None = None,
        seq: int = 0,
    ) -> None:
        self.topic = topic
        self.envelope = envelope
        self.attempts = 0
        # The log holding this event (as number seq) until it is acknowledged, if any.
        self.outbox = outbox
        self.seq = seq


def _envelope(payload: bytes) -> forward_pb2.Envelope:
    """The envelope a logged event holds; raises for one without topic or event."""
    envelope = forward_pb2.Envelope.FromString(payload)
    if not envelope.topic or not envelope.HasField("event") or not envelope.event.type_url:
        raise RecordError(f"incomplete event envelope ({len(payload)} bytes)")
    return envelope


def _mark_done(outbox: RecordLog, seq: int) -> None:
    try:
        outbox.done(seq)
    except OSError as exc:
        # At worst a later shim delivers the event again.
        _log.warning("cannot mark event %d done in %s: %s", seq, outbox.path, exc)


def _adopt_legacy(bundle: str, outbox: RecordLog) -> list[tuple[int, bytes]]:
    """Move the events a shim from before the log left undelivered (a file each) into
    the log, oldest first; their (seq, payload).

    A symlink, fifo or other non-regular file there was planted, never written by a
    shim: it is removed unread (see read_regular_file).
    """
    legacy = os.path.join(bundle, STATE_DIR_NAME, LEGACY_OUTBOX_DIR)
    try:
        names = sorted(n for n in os.listdir(legacy) if n.endswith(LEGACY_OUTBOX_SUFFIX))
    except FileNotFoundError:
        return []
    except OSError as exc:
        _log.warning("cannot read event outbox %s: %s", legacy, exc)
        return []
    adopted: list[tuple[int, bytes]] = []
    for name in names:
        path = os.path.join(legacy, name)
        try:
            data = read_regular_file(path)
        except (OSError, RecordError) as exc:
            _log.error("discarding unreadable outbox event %s: %s", path, exc)
            data = None
        if data:
            try:
                adopted.append((outbox.append(data), data))
            except OSError as exc:
                _log.warning("cannot move outbox event %s into the log: %s", path, exc)
                break  # the rest stay where they are, for a later attach
        with contextlib.suppress(OSError):
            os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(legacy)
    return adopted


class Publisher:
    """Publishes task events in order without ever blocking the caller."""

    def __init__(
        self,
        *,
        namespace: str,
        ttrpc_address: str | None,
        publish_binary: str | None,
        containerd_address: str | None,
        reaper: Reaper,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff_step: float = DEFAULT_BACKOFF_STEP,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
    ) -> None:
        self.namespace = namespace
        self._ttrpc_path = parse_ttrpc_address(ttrpc_address) if ttrpc_address else None
        self._publish_binary = publish_binary or None
        self._containerd_address = containerd_address or None
        self._reaper = reaper
        self._max_queue = max_queue
        self._max_attempts = max(1, max_attempts)
        self._backoff_step = backoff_step
        self._backoff_max = backoff_max
        self._queue: collections.deque[_Pending] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._client: Client | None = None
        self._closed = False
        self.dropped = 0
        self.sent = 0
        self._outboxes: dict[str, RecordLog] = {}
        if self._ttrpc_path is None and not (self._publish_binary and self._containerd_address):
            _log.warning("no TTRPC_ADDRESS and no publish binary: events will be dropped")

    @property
    def pending(self) -> int:
        return len(self._queue)

    def attach(self, container_id: str, bundle: str) -> int:
        """Log ``container_id``'s events in its bundle's outbox from now on, and queue
        (in their original order) any an earlier shim left undelivered there."""
        if container_id in self._outboxes:
            return 0
        try:
            outbox, left = RecordLog.load(bundle, OUTBOX_LOG)
        except (OSError, RecordError) as exc:
            _log.warning("cannot open the event outbox of %s: %s", container_id, exc)
            return 0
        if outbox.torn:
            _log.error("event outbox %s: discarded %d torn bytes", outbox.path, outbox.torn)
        self._outboxes[container_id] = outbox
        left += _adopt_legacy(bundle, outbox)
        replayed = 0
        for seq, payload in left:
            try:
                envelope = _envelope(payload)
            except Exception as exc:
                _log.error("discarding unreadable event %d in %s: %s", seq, outbox.path, exc)
                _mark_done(outbox, seq)
                continue
            self._enqueue(_Pending(envelope.topic, envelope, outbox, seq))
            replayed += 1
        if replayed:
            _log.info("replaying %d undelivered events from %s", replayed, outbox.path)
        return replayed

    def detach(self, container_id: str) -> None:
        """Stop logging new events of ``container_id``; queued ones still complete."""
        outbox = self._outboxes.pop(container_id, None)
        if outbox is not None:
            outbox.release()

    def publish(self, topic: str, event: Message) -> None:
        """Queue ``event`` under ``topic``; stamped with the current time. Never blocks
        (beyond appending to the outbox of an attached container)."""
        if self._closed:
            _log.warning("publisher closed, dropping event topic=%s", topic)
            self.dropped += 1
            return
        if len(self._queue) >= self._max_queue:
            _log.error("event queue full (%d), dropping event topic=%s", len(self._queue), topic)
            self.dropped += 1
            return
        envelope = forward_pb2.Envelope(
            timestamp=timeutil.timestamp_now(),
            namespace=self.namespace,
            topic=topic,
            event=anyutil.pack(event),
        )
        item = _Pending(topic, envelope)
        outbox = self._outboxes.get(str(getattr(event, "container_id", "")))
        if outbox is not None:
            try:
                item.seq = outbox.append(envelope.SerializeToString())
                item.outbox = outbox
            except (OSError, RecordError) as exc:
                # A full disk (or a removed bundle) must not cost the event: it then
                # stays queued in memory only.
                _log.warning("cannot persist event topic=%s in %s: %s", topic, outbox.path, exc)
        self._enqueue(item)

    def _enqueue(self, item: _Pending) -> None:
        self._queue.append(item)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._drain(), name="event-publisher"
            )

    async def close(self, timeout: float = 5.0) -> None:
        """Stop accepting events, give queued ones up to ``timeout`` s, then drop the rest."""
        self._closed = True
        task = self._task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        logs = {item.outbox for item in self._queue if item.outbox is not None}
        logs.update(self._outboxes.values())
        if self._queue:
            kept = sum(1 for item in self._queue if item.outbox is not None)
            _log.warning(
                "%d unpublished events at shutdown (%d stay in their outbox)",
                len(self._queue),
                kept,
            )
            self.dropped += len(self._queue)
            self._queue.clear()
        for outbox in logs:
            outbox.close()
        self._outboxes.clear()
        self._disconnect()

    # -- the single sender -----------------------------------------------------------

    async def _drain(self) -> None:
        while self._queue:
            item = self._queue[0]
            try:
                await self._send(item.envelope)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                item.attempts += 1
                permanent = isinstance(exc, PublishError) and exc.permanent
                # A persisted event waits for the receiver however long it takes.
                gives_up = item.outbox is None and item.attempts >= self._max_attempts
                if permanent or gives_up:
                    self._queue.popleft()
                    self._forget(item)
                    self.dropped += 1
                    _log.error(
                        "dropping event topic=%s after %d attempts: %s",
                        item.topic,
                        item.attempts,
                        exc,
                    )
                    continue
                delay = min(self._backoff_step * item.attempts, self._backoff_max)
                _log.warning(
                    "publish topic=%s failed (attempt %d), retrying in %.1fs: %s",
                    item.topic,
                    item.attempts,
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)
                continue
            self._queue.popleft()
            self._forget(item)
            self.sent += 1

    @staticmethod
    def _forget(item: _Pending) -> None:
        if item.outbox is not None:
            _mark_done(item.outbox, item.seq)

    async def _send(self, envelope: forward_pb2.Envelope) -> None:
        if self._ttrpc_path is not None:
            await self._forward(envelope)
        elif self._publish_binary and self._containerd_address:
            await self._run_publish_binary(envelope)
        else:
            raise PublishError("no event destination configured", permanent=True)

    async def _connect(self) -> Client:
        if self._client is None or self._client.closed:
            self._disconnect()
            assert self._ttrpc_path is not None
            self._client = await Client.connect(self._ttrpc_path, timeout=DIAL_TIMEOUT)
        return self._client

    def _disconnect(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    async def _forward(self, envelope: forward_pb2.Envelope) -> None:
        request = forward_pb2.ForwardRequest(envelope=envelope)
        metadata = {NAMESPACE_METADATA_KEY: self.namespace}
        # A connection containerd closed (it restarted) gets one immediate
        # redial, as the reference does; anything else goes to the backoff.
        for attempt in (1, 2):
            reused = self._client is not None and not self._client.closed
            try:
                client = await self._connect()
                await client.call(
                    EVENTS_SERVICE,
                    FORWARD_METHOD,
                    request,
                    empty_pb2.Empty,
                    timeout=CALL_TIMEOUT,
                    metadata=metadata,
                )
                return
            except ConnectionClosedError as exc:
                self._disconnect()
                if attempt == 1 and reused:
                    continue
                raise PublishError(str(exc)) from exc
            except TtrpcError as exc:
                if exc.code == Code.DEADLINE_EXCEEDED:
                    # The connection may be wedged; start afresh next time.
                    self._disconnect()
                raise PublishError(str(exc), permanent=exc.code in _PERMANENT) from exc
            except (OSError, TimeoutError) as exc:
                self._disconnect()
                raise PublishError(f"dial {self._ttrpc_path}: {exc}") from exc

    async def _run_publish_binary(self, envelope: forward_pb2.Envelope) -> None:
        assert self._publish_binary is not None and self._containerd_address is not None
        argv = [
            self._publish_binary,
            "--address",
            self._containerd_address,
            "publish",
            "--topic",
            envelope.topic,
            "--namespace",
            envelope.namespace,
        ]
        try:
            async with asyncio.timeout(PUBLISH_BINARY_TIMEOUT):
                result = await self._reaper.run(argv, input=envelope.event.SerializeToString())
        except (OSError, TimeoutError) as exc:
            raise PublishError(f"{os.path.basename(argv[0])} publish: {exc!r}") from exc
        if result.status != 0:
            output = result.output.decode(errors="replace").strip()
            raise PublishError(
                f"{os.path.basename(argv[0])} publish exited {result.status}: {output}"
            )
