from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Iterator

import pytest

from shim.log import (
    RUNTIME_NAME,
    FdHandler,
    LogrusFormatter,
    bind,
    format_line,
    setup,
)

T0 = 1_795_886_034_286_940_624  # 2026-11-28T17:13:54.286940624Z


def test_format_matches_logrus() -> None:
    line = format_line(
        "info",
        "starting signal loop",
        {"runtime": "io.containerd.runc.v2", "pid": 18300, "path": "/a/b", "namespace": "specns"},
        T0,
    )
    assert line == (
        'time="2026-11-28T17:13:54.286940624Z" level=info msg="starting signal loop"'
        " namespace=specns path=/a/b pid=18300 runtime=io.containerd.runc.v2\n"
    )


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        ("plain", "plain"),
        ("a-b.c_d/e@f^g+h", "a-b.c_d/e@f^g+h"),
        ("", '""'),
        ("two words", '"two words"'),
        ("k=v", '"k=v"'),
        ('say "hi"\\', '"say \\"hi\\"\\\\"'),
        ("line\nnext\ttab", '"line\\nnext\\ttab"'),
        ("nul\x00del\x7f", '"nul\\x00del\\x7f"'),
        ("café", '"café"'),
        (True, "true"),
        (None, '"<nil>"'),
        (3.5, "3.5"),
    ],
)
def test_value_quoting(value: object, rendered: str) -> None:
    line = format_line("debug", "m", {"k": value}, 0)
    assert line == f'time="1970-01-01T00:00:00.000000000Z" level=debug msg=m k={rendered}\n'


def test_formatter_levels_fields_and_exceptions() -> None:
    formatter = LogrusFormatter({"namespace": "ns", "id": "c1"})
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
    record.fields = {"id": "override", "exec": "e1"}
    out = formatter.format(record)
    assert re.fullmatch(
        r'time="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z" level=warning msg="hello you"'
        r" exec=e1 id=override namespace=ns\n",
        out,
    )
    try:
        raise RuntimeError("bad thing")
    except RuntimeError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "oops", (), sys.exc_info())
    out = formatter.format(record)
    assert 'level=error msg=oops error="RuntimeError: bad thing"' in out
    assert out.count("\n") == 1 and "stack=" in out


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        for fd in (r, w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def _logger(handler: logging.Handler, name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    return logger


async def test_full_fifo_never_blocks_and_recovers(pipe: tuple[int, int]) -> None:
    r, w = pipe
    handler = FdHandler(w, max_buffer=32 * 1024)
    handler.setFormatter(LogrusFormatter({"id": "c1"}))
    handler.attach_loop(asyncio.get_running_loop())
    log = _logger(handler, "test.full")
    try:
        # Far more than the 64 KiB pipe plus the 32 KiB buffer: must return at once.
        for i in range(5000):
            log.info("line %d %s", i, "x" * 40)
        assert handler._pending_size <= 32 * 1024 + 200
        data = _read_all(r)
        # The loop's writer callback drains the rest once the fifo has room.
        for _ in range(100):
            await asyncio.sleep(0.01)
            data += _read_all(r)
            if not handler._pending:
                break
        assert not handler._pending
        lines = data.decode().splitlines()
        assert all(line.startswith('time="') and line.endswith("id=c1") for line in lines)
        assert any("dropped" in line and "log lines" in line for line in lines)
        assert lines[-1].startswith('time="') and "line 4999" in lines[-1]
    finally:
        handler.close()


def test_epipe_is_survived_and_lines_kept(pipe: tuple[int, int]) -> None:
    r, w = pipe
    handler = FdHandler(w)
    handler.setFormatter(LogrusFormatter())
    log = _logger(handler, "test.epipe")
    os.close(r)
    log.info("nobody listens")
    log.info("still nobody")
    assert len(handler._pending) == 2
    handler.close()


def test_bind_adds_fields(pipe: tuple[int, int]) -> None:
    r, w = pipe
    handler = FdHandler(w)
    handler.setFormatter(LogrusFormatter({"namespace": "ns"}))
    log = _logger(handler, "test.bind")
    bound = bind(log, id="c1").bind(exec_id="e1")
    bound.info("exec started", extra={"fields": {"pid": 7}})
    bind(bound, more=1).debug("dbg")
    text = _read_all(r).decode().splitlines()
    assert text[0].endswith('msg="exec started" exec_id=e1 id=c1 namespace=ns pid=7')
    assert text[1].endswith("level=debug msg=dbg exec_id=e1 id=c1 more=1 namespace=ns")
    handler.close()


def test_setup_levels_and_fields(pipe: tuple[int, int]) -> None:
    r, w = pipe
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.raiseExceptions)
    try:
        handler = setup(debug=False, namespace="specns", id="c9", fd=w)
        logging.getLogger("shim.something").debug("hidden")
        logging.getLogger("shim.something").info("shown")
        handler.close()
        handler = setup(debug=True, namespace="specns", fd=w)
        logging.getLogger("shim.something").debug("now visible")
        handler.close()
    finally:
        root.handlers[:], root.level, logging.raiseExceptions = saved
    lines = _read_all(r).decode().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(
        f"level=info msg=shown id=c9 namespace=specns pid={os.getpid()} runtime={RUNTIME_NAME}"
    )
    assert 'msg="now visible"' in lines[1] and " id=" not in lines[1]
