"""Logging for the shim: logrus text lines on fd 2 (containerd's log fifo), never blocking.

Modules log through the standard ``logging`` package; ``setup()`` routes the root
logger here. Fields come from the handler (namespace, id, runtime, pid) and per call
from ``bind(logger, id=...)`` or ``extra={"fields": {...}}``.

The fifo holds 64 KiB and containerd may be gone or restarting, so a write that would
block is buffered (bounded, oldest lines dropped first) and flushed when the fd is
writable again; EPIPE keeps the buffer until a reader comes back. Nothing here raises
into the caller or blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
import traceback
from collections import deque
from collections.abc import Mapping, MutableMapping
from typing import Any

from shim import RUNTIME_NAME

__all__ = [
    "RUNTIME_NAME",
    "BoundLogger",
    "FdHandler",
    "LogrusFormatter",
    "bind",
    "format_line",
    "setup",
]


MAX_BUFFER = 256 * 1024

_LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "fatal",
}

# Characters logrus leaves unquoted besides ASCII letters and digits.
_BARE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._/@^+")
_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    "\\": "\\\\",
    '"': '\\"',
}


def _go_quote(text: str) -> str:
    """Like Go's ``strconv.Quote``, which logrus uses for values that need quoting."""
    out = ['"']
    for ch in text:
        esc = _ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) > 0xFFFF:
            out.append(f"\\U{ord(ch):08x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    out.append('"')
    return "".join(out)


def _value(value: object) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "<nil>"
    else:
        text = str(value)
    if text and all(ch in _BARE for ch in text):
        return text
    return _go_quote(text)


def _timestamp(time_ns: int) -> str:
    seconds, nanos = divmod(time_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"


def format_line(level: str, msg: str, fields: Mapping[str, object], time_ns: int) -> str:
    """One logrus text line: time, level, msg, then the fields sorted by key."""
    parts = [f'time="{_timestamp(time_ns)}"', f"level={level}", f"msg={_value(msg)}"]
    parts += [f"{key}={_value(fields[key])}" for key in sorted(fields)]
    return " ".join(parts) + "\n"


class LogrusFormatter(logging.Formatter):
    def __init__(self, fields: Mapping[str, object] | None = None) -> None:
        super().__init__()
        self.fields: dict[str, object] = dict(fields or {})

    def format(self, record: logging.LogRecord) -> str:
        fields = dict(self.fields)
        extra = getattr(record, "fields", None)
        if isinstance(extra, Mapping):
            fields.update(extra)
        if record.exc_info and record.exc_info[1] is not None:
            fields["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            fields["stack"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        level = _LEVELS.get(record.levelno, record.levelname.lower())
        # The call time; LogRecord.created is a float that would lose the nanoseconds.
        created_ns = getattr(record, "created_ns", None) or int(record.created * 1e9)
        return format_line(level, record.getMessage(), fields, created_ns)


class FdHandler(logging.Handler):
    """Writes formatted records to ``fd`` without ever blocking (see the module doc)."""

    def __init__(self, fd: int = 2, *, max_buffer: int = MAX_BUFFER) -> None:
        super().__init__()
        self.fd = fd
        self.max_buffer = max_buffer
        self.dropped = 0
        self._pending: deque[bytes] = deque()
        self._pending_size = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watching = False
        with contextlib.suppress(OSError):
            os.set_blocking(fd, False)

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush buffered lines as soon as the fd is writable, instead of at the next log."""
        self._loop = loop

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).encode("utf-8", errors="replace")
        except Exception:
            self.dropped += 1
            return
        self._pending.append(line)
        self._pending_size += len(line)
        self._trim()
        self._flush()

    def _trim(self) -> None:
        # Keep the head: it may be a line already partly written.
        while self._pending_size > self.max_buffer and len(self._pending) > 1:
            dropped = self._pending[1]
            del self._pending[1]
            self._pending_size -= len(dropped)
            self.dropped += 1

    def _flush(self) -> None:
        if self.dropped and self._pending:
            # Say so once the writer catches up, right after the line being written.
            note = format_line(
                "warning",
                f"dropped {self.dropped} log lines: log fifo full or unread",
                self.formatter.fields if isinstance(self.formatter, LogrusFormatter) else {},
                time.time_ns(),
            ).encode()
            self.dropped = 0
            self._pending.insert(1, note)
            self._pending_size += len(note)
        while self._pending:
            head = self._pending[0]
            try:
                written = os.write(self.fd, head)
            except BlockingIOError:
                self._watch()
                return
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno != errno.EPIPE:
                    # Nowhere to report it: drop what we have rather than grow.
                    self.dropped += len(self._pending)
                    self._pending.clear()
                    self._pending_size = 0
                return
            self._pending_size -= written
            if written == len(head):
                self._pending.popleft()
            else:
                self._pending[0] = head[written:]

    def _watch(self) -> None:
        if self._watching or self._loop is None or self._loop.is_closed():
            return
        self._watching = True
        try:
            # Records may come from worker threads; only the loop's thread may add a writer.
            self._loop.call_soon_threadsafe(self._start_watch)
        except RuntimeError:
            self._watching = False

    def _start_watch(self) -> None:
        with self.lock or contextlib.nullcontext():
            if not self._pending or self._loop is None:
                self._watching = False
                return
            try:
                self._loop.add_writer(self.fd, self._on_writable)
            except (OSError, RuntimeError, ValueError):
                self._watching = False

    def _unwatch(self) -> None:
        if self._watching and self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.remove_writer(self.fd)
        self._watching = False

    def _on_writable(self) -> None:
        with self.lock or contextlib.nullcontext():
            self._flush()
            if not self._pending:
                # Removed here, on the loop's thread, never from a logging thread.
                self._unwatch()

    def close(self) -> None:
        self._unwatch()
        super().close()


class BoundLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger that adds fixed fields (``id=…``) to every line."""

    def __init__(self, logger: logging.Logger, fields: Mapping[str, object]) -> None:
        super().__init__(logger, {})
        self.fields = dict(fields)

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.get("extra") or {})
        fields = dict(self.fields)
        fields.update(extra.get("fields") or {})
        extra["fields"] = fields
        kwargs["extra"] = extra
        return msg, kwargs

    def bind(self, **fields: object) -> BoundLogger:
        return BoundLogger(self.logger, {**self.fields, **fields})


def bind(logger: logging.Logger | BoundLogger, **fields: object) -> BoundLogger:
    if isinstance(logger, BoundLogger):
        return logger.bind(**fields)
    return BoundLogger(logger, fields)


def setup(
    *,
    debug: bool,
    namespace: str,
    id: str = "",
    fd: int = 2,
    fields: Mapping[str, object] | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
) -> FdHandler:
    """Route the root logger to ``fd`` in logrus format; debug lines only with -debug."""
    base: dict[str, object] = {"namespace": namespace, "runtime": RUNTIME_NAME, "pid": os.getpid()}
    if id:
        base["id"] = id
    base.update(fields or {})
    handler = FdHandler(fd)
    handler.setFormatter(LogrusFormatter(base))
    if loop is not None:
        handler.attach_loop(loop)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # A failing handler must never print tracebacks to a stderr that is the fifo itself.
    logging.raiseExceptions = False
    return handler
