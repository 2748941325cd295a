"""Server and client over real unix sockets, on the default loop and on uvloop."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
import uvloop
from google.protobuf.empty_pb2 import Empty

from protocol.proto.ttrpc_pb2 import KeyValue, StringList
from protocol.ttrpc import Client, Code, ConnectionClosedError, Method, RequestContext, Server
from protocol.ttrpc.frame import MAX_MESSAGE_SIZE, MessageType, encode_frame, encode_header
from protocol.ttrpc.messages import RequestMessage, decode_response, encode_request
from protocol.ttrpc.status import TtrpcError

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
SVC = "test.Svc"


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run[Any]:
    factory = asyncio.new_event_loop if request.param == "asyncio" else uvloop.new_event_loop

    def _run(coro: Coroutine[Any, Any, T]) -> T:
        async def guarded() -> T:
            async with asyncio.timeout(10):
                return await coro

        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(guarded())

    return _run


class Handlers:
    """The test service. ``gate`` holds ``Block`` calls until the test opens it."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []
        self.contexts: list[RequestContext] = []

    async def echo(self, ctx: RequestContext, req: KeyValue) -> KeyValue:
        self.contexts.append(ctx)
        return KeyValue(key=req.key, value=req.value)

    async def block(self, ctx: RequestContext, req: KeyValue) -> KeyValue:
        self.contexts.append(ctx)
        self.started.append(req.key)
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(req.key)
            raise
        self.finished.append(req.key)
        return KeyValue(key=req.key)

    async def metadata(self, ctx: RequestContext, req: Empty) -> StringList:
        return StringList(list=[f"{k}={v}" for k, vs in sorted(ctx.metadata.items()) for v in vs])

    async def fail(self, ctx: RequestContext, req: KeyValue) -> Empty:
        if req.key == "ttrpc":
            raise TtrpcError(Code.NOT_FOUND, "container not created: not found")
        if req.key == "timeout":
            raise TimeoutError
        if req.key == "cancel":
            raise asyncio.CancelledError
        if req.key == "nil":
            return None  # type: ignore[return-value]
        raise RuntimeError("boom: " + req.key)

    async def big(self, ctx: RequestContext, req: KeyValue) -> KeyValue:
        self.started.append("big")
        return KeyValue(key="x" * int(req.key))

    async def empty(self, ctx: RequestContext, req: Empty) -> Empty:
        return Empty()

    def register(self, server: Server) -> None:
        server.register(
            SVC,
            {
                "Echo": Method(KeyValue, self.echo),
                "Block": Method(KeyValue, self.block),
                "Metadata": Method(Empty, self.metadata),
                "Fail": Method(KeyValue, self.fail),
                "Big": Method(KeyValue, self.big),
                "Empty": Method(Empty, self.empty),
            },
        )


def abstract_name() -> str:
    return "\0pyshim-ttrpc-test-" + uuid.uuid4().hex


@asynccontextmanager
async def serving(**kwargs: Any) -> AsyncIterator[tuple[Server, Handlers, str]]:
    server = Server(**kwargs)
    handlers = Handlers()
    handlers.register(server)
    path = abstract_name()
    await server.serve_path(path)
    try:
        yield server, handlers, path
    finally:
        server.close()


async def echo(client: Client, key: str, **kw: Any) -> str:
    resp = await client.call(SVC, "Echo", KeyValue(key=key), KeyValue, **kw)
    return resp.key


async def open_raw(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    # uvloop cannot dial abstract names itself; connect first, then wrap.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, path)
    return await asyncio.open_unix_connection(sock=sock)


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    length, sid, type_, _flags = struct.unpack(">IIBB", await reader.readexactly(10))
    return sid, type_, await reader.readexactly(length)


def raw_request(sid: int, method: str, payload: bytes = b"", timeout_nano: int = 0) -> bytes:
    data = encode_request(RequestMessage(SVC, method, payload, timeout_nano))
    return encode_frame(sid, MessageType.REQUEST, data)


# ------------------------------------------------------------------ calls


def test_concurrent_calls_complete_out_of_order(run: Run[None]) -> None:
    async def main() -> None:
        async with serving() as (_, h, path), await Client.connect(path) as client:
            slow = asyncio.create_task(client.call(SVC, "Block", KeyValue(key="slow"), KeyValue))
            while not h.started:
                await asyncio.sleep(0)
            assert await echo(client, "fast") == "fast"
            assert not slow.done()
            h.gate.set()
            assert (await slow).key == "slow"
            assert [c.stream_id for c in h.contexts] == [1, 3]

    run(main())


def test_many_parallel_calls(run: Run[None]) -> None:
    async def main() -> None:
        async with serving() as (_, _h, path), await Client.connect(path) as client:
            keys = [str(i) for i in range(200)]
            got = await asyncio.gather(*(echo(client, k) for k in keys))
            assert got == keys

    run(main())


def test_metadata_and_deadline_reach_the_handler(run: Run[None]) -> None:
    async def main() -> None:
        async with serving() as (_, h, path), await Client.connect(path) as client:
            resp = await client.call(
                SVC, "Metadata", Empty(), StringList, metadata={"X-Key": ["a", "b"], "y": "z"}
            )
            assert list(resp.list) == ["x-key=a", "x-key=b", "y=z"]
            loop = asyncio.get_running_loop()
            before = loop.time()
            await echo(client, "d", timeout=30)
            deadline = h.contexts[-1].deadline
            assert deadline is not None and before + 29 < deadline <= loop.time() + 30
            await echo(client, "n")
            assert h.contexts[-1].deadline is None

    run(main())


def test_server_deadline_answers_4(run: Run[None]) -> None:
    async def main() -> None:
        async with serving() as (_, h, path):
            reader, writer = await open_raw(path)
            writer.write(raw_request(1, "Block", KeyValue(key="a").SerializeToString(), 50_000_000))
            sid, type_, data = await read_frame(reader)
            assert (sid, type_) == (1, MessageType.RESPONSE)
            resp = decode_response(data)
            assert (resp.code, resp.message) == (
                Code.DEADLINE_EXCEEDED,
                "context deadline exceeded",
            )
            assert h.finished == []
            writer.close()

    run(main())


def test_client_timeout_drops_late_answer(run: Run[None]) -> None:
    async def main() -> None:
        async with serving() as (_, h, path), await Client.connect(path) as client:
            with pytest.raises(TtrpcError) as info:
                await client.call(SVC, "Block", KeyValue(key="t"), KeyValue, timeout=0.05)
            assert info.value.code == Code.DEADLINE_EXCEEDED
            # The server saw the deadline too.
            assert h.contexts[-1].deadline is not None
            h.gate.set()
            assert await echo(client, "after") == "after"

    run(main())


def test_cancelled_call_is_forgotten(run: Run[None]) -> None:
    async def main() -> None:
        async with serving() as (_, h, path), await Client.connect(path) as client:
            task = asyncio.create_task(client.call(SVC, "Block", KeyValue(key="c"), KeyValue))
            while not h.started:
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            h.gate.set()
            while not h.finished:
                await asyncio.sleep(0.001)
            assert await echo(client, "still") == "still"

    run(main())


def test_unknown_service_and_method(run: Run[None]) -> None:
    async def main() -> None:
        async with serving() as (_, _h, path), await Client.connect(path) as client:
            with pytest.raises(TtrpcError) as info:
                await client.call("nope.Svc", "Echo", Empty(), Empty)
            assert (info.value.code, info.value.message) == (Code.UNIMPLEMENTED, "service nope.Svc")
            with pytest.raises(TtrpcError) as info:
                await client.call(SVC, "Nope", Empty(), Empty)
            assert (info.value.code, info.value.message) == (Code.UNIMPLEMENTED, "method Nope")

    run(main())


@pytest.mark.parametrize(
    ("kind", "code", "message"),
    [
        ("ttrpc", Code.NOT_FOUND, "container not created: not found"),
        ("timeout", Code.DEADLINE_EXCEEDED, "context deadline exceeded"),
        ("cancel", Code.CANCELLED, "context canceled"),
        ("nil", Code.UNKNOWN, "ttrpc: marshal called with nil"),
        ("x", Code.UNKNOWN, "boom: x"),
    ],
)
def test_handler_exception_mapping(
    run: Run[None], caplog: pytest.LogCaptureFixture, kind: str, code: Code, message: str
) -> None:
    async def main() -> None:
        async with serving() as (_, _h, path), await Client.connect(path) as client:
            with pytest.raises(TtrpcError) as info:
                await client.call(SVC, "Fail", KeyValue(key=kind), Empty)
            assert (info.value.code, info.value.message) == (code, message)
            assert await echo(client, "ok") == "ok"

    with caplog.at_level(logging.ERROR, logger="protocol.ttrpc"):
        run(main())
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == (1 if kind == "x" else 0)


def test_empty_result(run: Run[None]) -> None:
    async def main() -> None:
        async with serving() as (_, _h, path):
            reader, writer = await open_raw(path)
            writer.write(raw_request(5, "Empty"))
            header = await reader.readexactly(10)
            assert header == bytes.fromhex("00000000000000050200")
            writer.close()

    run(main())


# ------------------------------------------------------------------ limits and bad input


def test_oversized_frame_answered_and_connection_kept(run: Run[None]) -> None:
    async def main() -> None:
        async with serving() as (_, _h, path):
            reader, writer = await open_raw(path)
            n = MAX_MESSAGE_SIZE + 1
            writer.write(encode_header(n, 7, MessageType.REQUEST) + bytes(n))
            writer.write(raw_request(9, "Echo", KeyValue(key="k").SerializeToString()))
            sid, _, data = await read_frame(reader)
            resp = decode_response(data)
            assert (sid, resp.code, resp.message) == (
                7,
                Code.RESOURCE_EXHAUSTED,
                "message length 4194305 exceed maximum message size of 4194304",
            )
            sid, _, data = await read_frame(reader)
            assert sid == 9
            assert KeyValue.FromString(decode_response(data).payload).key == "k"
            writer.close()

    run(main())


def test_client_refuses_oversized_request_locally(run: Run[None]) -> None:
    async def main() -> None:
        async with serving() as (_, h, path), await Client.connect(path) as client:
            with pytest.raises(TtrpcError) as info:
                await client.call(SVC, "Echo", KeyValue(key="x" * MAX_MESSAGE_SIZE), KeyValue)
            assert info.value.code == Code.RESOURCE_EXHAUSTED
            assert await echo(client, "ok") == "ok"
            assert len(h.contexts) == 1

    run(main())


def test_truncated_header_then_close_does_not_hurt_the_server(run: Run[None]) -> None:
    async def main() -> None:
        async with serving() as (server, _h, path):
            for junk in (b"\x00\x00\x00", encode_header(100, 1, 1) + b"abc"):
                _, writer = await open_raw(path)
                writer.write(junk)
                await writer.drain()
                writer.close()
                await writer.wait_closed()
            async with await Client.connect(path) as client:
                assert await echo(client, "fine") == "fine"
            while server.connection_count:
                await asyncio.sleep(0.001)

    run(main())


def test_peer_close_lets_handlers_finish_and_drops_answers(
    run: Run[None], caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving() as (server, h, path):
            client = await Client.connect(path)
            task = asyncio.create_task(client.call(SVC, "Block", KeyValue(key="p"), KeyValue))
            while not h.started:
                await asyncio.sleep(0)
            client.close()
            with pytest.raises(ConnectionClosedError):
                await task
            while server.connection_count:
                await asyncio.sleep(0.001)
            h.gate.set()
            while not h.finished:
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.01)

    with caplog.at_level(logging.WARNING):
        run(main())
    assert h_errors(caplog) == []


def h_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_max_in_flight_pauses_reading(run: Run[None]) -> None:
    async def main() -> None:
        async with serving(max_in_flight=2) as (_, h, path), await Client.connect(path) as client:
            calls = [
                asyncio.create_task(client.call(SVC, "Block", KeyValue(key=str(i)), KeyValue))
                for i in range(3)
            ]
            while len(h.started) < 2:
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.02)
            assert h.started == ["0", "1"]
            h.gate.set()
            assert [(await c).key for c in calls] == ["0", "1", "2"]

    run(main())


def test_max_connections_refuses_extra(run: Run[None]) -> None:
    async def main() -> None:
        limited = serving(max_connections=1)
        async with limited as (_, _h, path), await Client.connect(path) as first:
            assert await echo(first, "1") == "1"
            second = await Client.connect(path)
            with pytest.raises(ConnectionClosedError):
                await echo(second, "2")
            second.close()
            assert await echo(first, "again") == "again"

    run(main())


def test_peer_that_never_reads_does_not_block_others(run: Run[None]) -> None:
    reply = 128 << 10
    requests = 200

    async def main() -> None:
        limits = serving(max_in_flight=4, write_buffer_high=64 << 10, write_buffer_low=16 << 10)
        async with limits as (_, h, path):
            _, hog = await open_raw(path)
            payload = KeyValue(key=str(reply)).SerializeToString()
            hog.write(b"".join(raw_request(2 * i + 1, "Big", payload) for i in range(requests)))
            async with await Client.connect(path) as client:
                for i in range(20):
                    assert await echo(client, str(i)) == str(i)
            await asyncio.sleep(0.05)
            # The server stopped reading the hog: only a few answers were produced
            # (kernel buffers + one write buffer + the in-flight limit), not 200.
            assert 0 < h.started.count("big") < 30
            hog.close()

    run(main())


# ------------------------------------------------------------------ client robustness


@asynccontextmanager
async def fake_server(
    behaviour: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]],
) -> AsyncIterator[str]:
    path = abstract_name()
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen()
    srv = await asyncio.start_unix_server(behaviour, sock=lsock)
    try:
        yield path
    finally:
        srv.close()


def test_client_drops_response_for_unknown_stream(
    run: Run[None], caplog: pytest.LogCaptureFixture
) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sid, _, _ = await read_frame(reader)
        stray = KeyValue(key="stray").SerializeToString()
        good = KeyValue(key="good").SerializeToString()
        writer.write(encode_frame(99, MessageType.RESPONSE, b"\x12" + bytes([len(stray)]) + stray))
        writer.write(encode_frame(sid, MessageType.RESPONSE, b"\x12" + bytes([len(good)]) + good))
        await writer.drain()
        await reader.read()
        writer.close()

    async def main() -> None:
        async with fake_server(behaviour) as path, await Client.connect(path) as client:
            assert await echo(client, "x") == "good"

    with caplog.at_level(logging.WARNING, logger="protocol.ttrpc"):
        run(main())
    assert any("unknown stream 99" in r.getMessage() for r in caplog.records)


def test_connection_drop_fails_every_pending_call_at_once(run: Run[None]) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(3):
            await read_frame(reader)
        writer.close()

    async def main() -> None:
        async with fake_server(behaviour) as path:
            client = await Client.connect(path)
            loop = asyncio.get_running_loop()
            start = loop.time()
            results = await asyncio.gather(
                *(echo(client, str(i)) for i in range(3)), return_exceptions=True
            )
            assert loop.time() - start < 1
            assert all(isinstance(r, ConnectionClosedError) for r in results), results
            assert all(str(r) == "UNAVAILABLE: ttrpc: closed" for r in results)
            assert client.closed
            with pytest.raises(ConnectionClosedError):
                await echo(client, "later")

    run(main())


def test_connect_errors(run: Run[None]) -> None:
    async def main() -> None:
        with pytest.raises(OSError):
            await Client.connect(abstract_name(), timeout=1)

    run(main())


# ------------------------------------------------------------------ listeners and shutdown


def test_serve_filesystem_path_and_existing_socket(run: Run[None]) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory(dir="/tmp") as d:
            server = Server()
            Handlers().register(server)
            await server.serve_path(os.path.join(d, "a.sock"))
            # The shim gets its listener already bound and listening (fd 3).
            lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            lsock.bind(os.path.join(d, "b.sock"))
            lsock.listen()
            await server.serve_socket(lsock)
            await server.serve_abstract(abstract_name()[1:])
            for name in ("a.sock", "b.sock"):
                async with await Client.connect(os.path.join(d, name)) as client:
                    assert await echo(client, name) == name
            # An already-connected socket can be wrapped as a client too.
            csock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            csock.connect(os.path.join(d, "b.sock"))
            async with await Client.from_socket(csock) as client:
                assert await echo(client, "wrapped") == "wrapped"
            assert await server.shutdown(1) is True
            with pytest.raises(OSError):
                await Client.connect(os.path.join(d, "b.sock"))

    run(main())


def test_graceful_shutdown_waits_for_in_flight_call(run: Run[None]) -> None:
    async def main() -> None:
        async with serving() as (server, h, path):
            busy = await Client.connect(path)
            idle = await Client.connect(path)
            call = asyncio.create_task(busy.call(SVC, "Block", KeyValue(key="s"), KeyValue))
            while not h.started:
                await asyncio.sleep(0)
            stopping = asyncio.create_task(server.shutdown(5))
            await idle.wait_closed()  # an idle connection closes at once
            with pytest.raises(OSError):
                await Client.connect(path)
            assert not stopping.done() and not call.done()
            h.gate.set()
            assert (await call).key == "s"
            assert await stopping is True
            await busy.wait_closed()

    run(main())


def test_shutdown_timeout_forces_close(run: Run[None]) -> None:
    async def main() -> None:
        async with serving() as (server, h, path), await Client.connect(path) as client:
            call = asyncio.create_task(client.call(SVC, "Block", KeyValue(key="f"), KeyValue))
            while not h.started:
                await asyncio.sleep(0)
            assert await server.shutdown(0.05) is False
            with pytest.raises(ConnectionClosedError):
                await call
            await server.wait_closed()
            assert h.finished == []

    run(main())


def test_close_cancels_handlers_of_departed_peers(run: Run[None]) -> None:
    async def main() -> None:
        async with serving() as (server, h, path):
            client = await Client.connect(path)
            task = asyncio.create_task(client.call(SVC, "Block", KeyValue(key="d"), KeyValue))
            while not h.started:
                await asyncio.sleep(0)
            client.close()
            with pytest.raises(ConnectionClosedError):
                await task
            while server.connection_count:
                await asyncio.sleep(0.001)
            server.close()
            await asyncio.sleep(0)
            assert h.cancelled == ["d"]

    run(main())


def test_peer_check(run: Run[None]) -> None:
    seen: list[tuple[int, int, int]] = []

    def refuse(pid: int, uid: int, gid: int) -> bool:
        seen.append((pid, uid, gid))
        return False

    async def main() -> None:
        async with serving(peer_check=refuse) as (_, h, path):
            client = await Client.connect(path)
            with pytest.raises(ConnectionClosedError):
                await echo(client, "x")
            assert h.contexts == []
        from protocol.ttrpc.server import same_user_peer_check

        same_user = serving(peer_check=same_user_peer_check)
        async with same_user as (_, _h, path), await Client.connect(path) as client:
            assert await echo(client, "ok") == "ok"

    run(main())
    assert seen == [(os.getpid(), os.geteuid(), os.getegid())]
