"""Event publisher: one ordered queue, one sender, ttrpc Forward to containerd.

See events.md. Unlike the Go shim, a failing event stays at the head of the
queue while it is retried, so events leave in exactly the order they were
produced (consumers rely on create < start < exit < delete). Exits are on disk
before they are published, so an event dropped after its last attempt loses no
information containerd cannot get back through State/Wait/Delete.

Nothing runs while the queue is empty: the sender task exits and no timer is
armed, so an idle shim never wakes up.

Durable outbox: once a container is attached (its bundle known), each of its events is
written to ``<bundle>/pyshim/outbox/<time>-<seq>.pb`` (the serialized Envelope) before
it is queued and removed once the Forward was acknowledged. Such an event is never
dropped for a transient failure (containerd or pyshimd down for longer than the
reference's ~20 s of retries): it is retried with a capped backoff for as long as the
shim lives. A later shim attaching the same bundle queues what is left there, in
order. Receivers see an event twice if the acknowledgement was lost; pyshimd dedupes
exits, containerd does not (its consumers tolerate duplicate exits).

An entry is written atomically (temp file + rename) but not fsynced: it is there for a
shim that dies (SIGKILL, crash) before delivering it, and the page cache outlives any
process. A kernel crash or power loss kills every container and the containerd state
those events describe, so an fsync (~1-2 ms on the exec and exit paths) would protect
nothing anyone could use; the replay skips an entry such a crash left empty or torn.
The exit itself is fsynced in its record (shim.state) before it is published.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import time
from pathlib import Path

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from protocol.proto import anyutil, timeutil
from protocol.proto.events import forward_pb2
from protocol.ttrpc.address import parse_ttrpc_address
from protocol.ttrpc.client import Client
from protocol.ttrpc.status import Code, ConnectionClosedError, TtrpcError
from shim.reaper import Reaper
from shim.recordfile import RecordError, read_regular_file
from shim.state import write_atomic

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


OUTBOX_DIR = "outbox"
OUTBOX_SUFFIX = ".pb"


class _Pending:
    __slots__ = ("attempts", "envelope", "path", "topic")

    def __init__(
        self, topic: str, envelope: forward_pb2.Envelope, path: Path | None = None
    ) -> None:
        self.topic = topic
        self.envelope = envelope
        self.attempts = 0
        # The outbox file holding this event until it is acknowledged, if any.
        self.path = path


def outbox_dir(bundle: str) -> Path:
    return Path(bundle) / "pyshim" / OUTBOX_DIR


def _read_entry(path: Path) -> forward_pb2.Envelope | None:
    """The envelope in outbox file ``path``; None when it is gone.

    Raises for anything the writer cannot have left complete: a symlink, fifo or other
    non-regular file (refused unread, see read_regular_file), bytes that do not parse,
    or an envelope without topic or event (an entry a kernel crash left empty).
    """
    data = read_regular_file(path)
    if data is None:
        return None
    envelope = forward_pb2.Envelope.FromString(data)
    if not envelope.topic or not envelope.HasField("event") or not envelope.event.type_url:
        raise RecordError(f"incomplete event envelope ({len(data)} bytes)")
    return envelope


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
        self._outboxes: dict[str, Path] = {}
        self._seq = itertools.count()
        if self._ttrpc_path is None and not (self._publish_binary and self._containerd_address):
            _log.warning("no TTRPC_ADDRESS and no publish binary: events will be dropped")

    @property
    def pending(self) -> int:
        return len(self._queue)

    def attach(self, container_id: str, bundle: str) -> int:
        """Persist ``container_id``'s events in its bundle's outbox from now on, and queue
        (in their original order) any an earlier shim left undelivered there."""
        outbox = outbox_dir(bundle)
        self._outboxes[container_id] = outbox
        try:
            names = sorted(n for n in os.listdir(outbox) if n.endswith(OUTBOX_SUFFIX))
        except FileNotFoundError:
            return 0
        except OSError as exc:
            _log.warning("cannot read event outbox %s: %s", outbox, exc)
            return 0
        replayed = 0
        for name in names:
            path = outbox / name
            try:
                envelope = _read_entry(path)
            except Exception as exc:
                _log.error("discarding unreadable outbox event %s: %s", path, exc)
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            if envelope is None:
                continue
            self._enqueue(_Pending(envelope.topic, envelope, path))
            replayed += 1
        if replayed:
            _log.info("replaying %d undelivered events from %s", replayed, outbox)
        return replayed

    def detach(self, container_id: str) -> None:
        """Stop persisting new events of ``container_id``; queued ones still complete."""
        self._outboxes.pop(container_id, None)

    def publish(self, topic: str, event: Message) -> None:
        """Queue ``event`` under ``topic``; stamped with the current time. Never blocks
        (beyond writing the outbox file for an attached container)."""
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
        path = self._persist(str(getattr(event, "container_id", "")), envelope)
        self._enqueue(_Pending(topic, envelope, path))

    def _persist(self, container_id: str, envelope: forward_pb2.Envelope) -> Path | None:
        outbox = self._outboxes.get(container_id)
        if outbox is None:
            return None
        # Time first: a later shim's names sort after ours; the counter orders our own.
        path = outbox / f"{time.time_ns():020d}-{next(self._seq):08d}{OUTBOX_SUFFIX}"
        try:
            with contextlib.suppress(FileExistsError):
                # Never create the bundle itself: containerd may have removed it.
                outbox.parent.mkdir(mode=0o700, exist_ok=True)
                outbox.mkdir(mode=0o700)
            write_atomic(path, envelope.SerializeToString(), durable=False)
        except OSError as exc:
            # A full disk must not cost the event: it stays queued in memory only.
            _log.warning("cannot persist event topic=%s in %s: %s", envelope.topic, outbox, exc)
            return None
        return path

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
        if self._queue:
            kept = sum(1 for item in self._queue if item.path is not None)
            _log.warning(
                "%d unpublished events at shutdown (%d stay in their outbox)",
                len(self._queue),
                kept,
            )
            self.dropped += len(self._queue)
            self._queue.clear()
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
                gives_up = item.path is None and item.attempts >= self._max_attempts
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
        if item.path is not None:
            try:
                item.path.unlink()
            except FileNotFoundError:
                pass  # the bundle was removed already
            except OSError as exc:
                _log.warning("cannot remove delivered event %s: %s", item.path, exc)

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
