"""Every resource limit the shim enforces, and what exceeding it returns.

docs/reliability.md lists the same limits; a change to one of them must show here.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from protocol.proto.ttrpc_pb2 import KeyValue
from protocol.ttrpc import Client, Method, RequestContext, Server
from protocol.ttrpc.frame import MAX_MESSAGE_SIZE, MessageType, encode_frame, encode_header
from protocol.ttrpc.messages import RequestMessage, decode_response, encode_request
from protocol.ttrpc.server import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_WRITE_BUFFER_HIGH,
)
from protocol.ttrpc.status import Code, TtrpcError
from shim import daemon
from shim.ids import MAX_LENGTH, InvalidIdentifierError, validate_id
from shim.state import (
    ExitRecord,
    UnsafePathError,
    exit_record_path,
    read_record,
    write_atomic,
    write_record,
)

SVC = "limits.Svc"
GO_OVERSIZE = "message length {} exceed maximum message size of 4194304"


class Svc:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started: list[str] = []

    async def size(self, ctx: RequestContext, req: KeyValue) -> KeyValue:
        return KeyValue(key=str(len(req.value)))

    async def big(self, ctx: RequestContext, req: KeyValue) -> KeyValue:
        return KeyValue(value="x" * int(req.key))

    async def fail(self, ctx: RequestContext, req: KeyValue) -> KeyValue:
        raise TtrpcError(Code.INVALID_ARGUMENT, req.value * int(req.key))

    async def block(self, ctx: RequestContext, req: KeyValue) -> KeyValue:
        self.started.append(req.key)
        await self.gate.wait()
        return req

    def methods(self) -> dict[str, Method[KeyValue, KeyValue]]:
        return {
            "Size": Method(KeyValue, self.size),
            "Big": Method(KeyValue, self.big),
            "Fail": Method(KeyValue, self.fail),
            "Block": Method(KeyValue, self.block),
        }


@asynccontextmanager
async def serving(**kwargs: object) -> AsyncIterator[tuple[Server, Svc, str]]:
    server = Server(**kwargs)  # type: ignore[arg-type]
    svc = Svc()
    server.register(SVC, svc.methods())
    path = "\0pyshim-limits-" + uuid.uuid4().hex
    await server.serve_path(path)
    try:
        yield server, svc, path
    finally:
        svc.gate.set()
        server.close()


class Raw:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: str) -> Raw:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, path)
        return cls(*await asyncio.open_unix_connection(sock=sock))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_frame(self) -> tuple[int, int, bytes]:
        async with asyncio.timeout(5):
            head = await self.reader.readexactly(10)
            length, sid, type_, _ = struct.unpack(">IIBB", head)
            return sid, type_, await self.reader.readexactly(length)

    async def closed_with_nothing_sent(self) -> bool:
        # The server aborts; with our unread request in its buffer that is an RST.
        async with asyncio.timeout(5):
            try:
                return await self.reader.read(1) == b""
            except ConnectionResetError:
                return True

    def close(self) -> None:
        self.writer.close()


def request(sid: int, method: str, req: KeyValue) -> bytes:
    data = encode_request(RequestMessage(SVC, method, req.SerializeToString()))
    return encode_frame(sid, MessageType.REQUEST, data)


def request_of_exact_size(sid: int, size: int) -> bytes:
    """A Size request whose envelope is exactly ``size`` bytes."""
    pad = size
    while True:
        data = encode_request(
            RequestMessage(SVC, "Size", KeyValue(value="v" * pad).SerializeToString())
        )
        if len(data) == size:
            return encode_header(len(data), sid, MessageType.REQUEST) + data
        pad -= len(data) - size


# ------------------------------------------------------------------ 4 MiB frames


async def test_frame_limit_is_exactly_4_mib_and_the_connection_survives() -> None:
    assert MAX_MESSAGE_SIZE == 4 << 20
    async with serving() as (_, _svc, path):
        raw = await Raw.open(path)
        try:
            await raw.send(request_of_exact_size(1, MAX_MESSAGE_SIZE))
            sid, type_, data = await raw.read_frame()
            assert (sid, type_) == (1, MessageType.RESPONSE)
            assert decode_response(data).code == 0

            await raw.send(request_of_exact_size(3, MAX_MESSAGE_SIZE + 1))
            sid, _, data = await raw.read_frame()
            resp = decode_response(data)
            assert sid == 3
            assert (resp.code, resp.message) == (
                Code.RESOURCE_EXHAUSTED,
                GO_OVERSIZE.format(MAX_MESSAGE_SIZE + 1),
            )

            await raw.send(request(5, "Size", KeyValue(value="ok")))
            sid, _, data = await raw.read_frame()
            assert sid == 5
            assert KeyValue.FromString(decode_response(data).payload).key == "2"
        finally:
            raw.close()


async def test_oversized_answer_is_status_8_and_the_connection_survives() -> None:
    async with serving() as (_, _svc, path), await Client.connect(path) as client:
        with pytest.raises(TtrpcError) as err:
            await client.call(SVC, "Big", KeyValue(key=str(5 << 20)), KeyValue, timeout=10)
        assert err.value.code == Code.RESOURCE_EXHAUSTED
        assert err.value.message.startswith("message length ")
        assert err.value.message.endswith("exceed maximum message size of 4194304")
        ok = await client.call(SVC, "Size", KeyValue(value="abc"), KeyValue, timeout=5)
        assert ok.key == "3"


async def test_client_refuses_an_oversized_request_without_sending() -> None:
    async with serving() as (_, _svc, path), await Client.connect(path) as client:
        with pytest.raises(TtrpcError) as err:
            await client.call(SVC, "Size", KeyValue(value="v" * (5 << 20)), KeyValue)
        assert err.value.code == Code.RESOURCE_EXHAUSTED
        ok = await client.call(SVC, "Size", KeyValue(value="a"), KeyValue, timeout=5)
        assert ok.key == "1"


async def test_huge_multibyte_error_message_is_cut_to_fit_a_frame() -> None:
    # Fuzz finding: cut by characters, 3-byte characters overflowed the frame and the
    # caller never got an answer.
    async with serving() as (_, _svc, path), await Client.connect(path) as client:
        with pytest.raises(TtrpcError) as err:
            await client.call(
                SVC, "Fail", KeyValue(key=str(3 << 20), value="€"), KeyValue, timeout=10
            )
        assert err.value.code == Code.INVALID_ARGUMENT
        assert 0 < len(err.value.message.encode()) <= MAX_MESSAGE_SIZE
        ok = await client.call(SVC, "Size", KeyValue(value="a"), KeyValue, timeout=5)
        assert ok.key == "1"


# ------------------------------------------------------------------ connections


def test_default_limits() -> None:
    # The values docs/reliability.md promises.
    assert (DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_IN_FLIGHT) == (128, 1024)
    assert DEFAULT_WRITE_BUFFER_HIGH == 1 << 20


async def test_connections_beyond_the_cap_are_closed_with_nothing_sent() -> None:
    async with serving(max_connections=2) as (server, _svc, path):
        first, second = await Raw.open(path), await Raw.open(path)
        extra = await Raw.open(path)
        try:
            assert await extra.closed_with_nothing_sent()
            for sid, conn in ((1, first), (3, second)):
                await conn.send(request(sid, "Size", KeyValue(value="x")))
                assert (await conn.read_frame())[0] == sid
            first.close()
            async with asyncio.timeout(5):
                while server.connection_count > 1:
                    await asyncio.sleep(0.01)
            again = await Raw.open(path)
            await again.send(request(1, "Size", KeyValue(value="x")))
            assert (await again.read_frame())[0] == 1
            again.close()
        finally:
            for conn in (first, second, extra):
                conn.close()


async def test_in_flight_cap_is_per_connection() -> None:
    async with serving(max_in_flight=2) as (_, svc, path):
        busy, other = await Raw.open(path), await Raw.open(path)
        try:
            for i in range(3):
                await busy.send(request(1 + 2 * i, "Block", KeyValue(key=f"b{i}")))
            async with asyncio.timeout(5):
                while len(svc.started) < 2:
                    await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            assert svc.started == ["b0", "b1"]
            # The cap on one connection does not hold back another.
            await other.send(request(1, "Size", KeyValue(value="xy")))
            assert (await other.read_frame())[0] == 1
            svc.gate.set()
            got = sorted([(await busy.read_frame())[0] for _ in range(3)])
            assert got == [1, 3, 5]
            assert svc.started == ["b0", "b1", "b2"]
        finally:
            busy.close()
            other.close()


@pytest.mark.parametrize("verdict", ["refuse", "raise"])
async def test_peer_check_refusal_closes_with_nothing_sent(verdict: str) -> None:
    seen: list[tuple[int, int, int]] = []

    def check(pid: int, uid: int, gid: int) -> bool:
        seen.append((pid, uid, gid))
        if verdict == "raise":
            raise RuntimeError("broken check")
        return False

    async with serving(peer_check=check) as (server, _svc, path):
        raw = await Raw.open(path)
        try:
            await raw.send(request(1, "Size", KeyValue(value="x")))
            assert await raw.closed_with_nothing_sent()
        finally:
            raw.close()
        assert seen == [(os.getpid(), os.geteuid(), os.getegid())]
        assert server.connection_count == 0


def test_daemon_peer_check_admits_root_and_our_own_user_only() -> None:
    uid, gid = os.geteuid(), os.getegid()
    assert daemon.peer_check(1, 0, 12345)
    assert daemon.peer_check(1, uid, gid)
    assert not daemon.peer_check(1, 65534, 65534)
    if uid != 0:
        assert not daemon.peer_check(1, uid, gid + 1)


# ------------------------------------------------------------------ identifiers


@pytest.mark.parametrize("value", ["a" * MAX_LENGTH, "c1", "a.b-c_d", "A9"])
def test_ids_within_the_rules(value: str) -> None:
    assert validate_id("container id", value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "a" * (MAX_LENGTH + 1),
        "..",
        ".",
        "a/b",
        "/abs",
        "../up",
        "a..b",
        "-lead",
        "trail-",
        "c1\n",
        "c\x001",
        "é",
        "a b",
        "\u0661",  # ARABIC-INDIC DIGIT ONE: \d would take it, our class must not
    ],
)
def test_ids_outside_the_rules_are_invalid_argument(value: str) -> None:
    with pytest.raises(InvalidIdentifierError) as err:
        validate_id("container id", value)
    assert err.value.code == Code.INVALID_ARGUMENT
    assert err.value.message.startswith("container id: identifier ")


def test_max_id_length_is_containerds() -> None:
    assert MAX_LENGTH == 76


# ------------------------------------------------------------------ state paths


def _record() -> ExitRecord:
    return ExitRecord(container_id="c1", exec_id="", pid=1, exit_status=0, exited_at_ns=1)


@pytest.mark.parametrize("pid", ["..", "../x", "a/b", "/etc/passwd", "", "."])
def test_exit_record_path_refuses_escaping_process_ids(tmp_path: Path, pid: str) -> None:
    with pytest.raises(InvalidIdentifierError):
        exit_record_path(str(tmp_path), pid)


@pytest.mark.parametrize("link", ["pyshim", "pyshim/exits"])
def test_state_write_refuses_a_symlinked_state_dir(tmp_path: Path, link: str) -> None:
    bundle, outside = tmp_path / "bundle", tmp_path / "outside"
    bundle.mkdir()
    outside.mkdir()
    if link == "pyshim/exits":
        (bundle / "pyshim").mkdir()
    (bundle / link).symlink_to(outside)
    with pytest.raises(UnsafePathError):
        write_record(exit_record_path(str(bundle), "c1"), _record())
    assert list(outside.iterdir()) == []


def test_state_write_never_follows_a_planted_tmp_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = exit_record_path(str(tmp_path / "bundle"), "c1")
    path.parent.mkdir(parents=True)
    (path.parent / f".{path.name}.{os.getpid()}.tmp").symlink_to(victim)
    write_record(path, _record())
    assert victim.read_text() == "precious"
    assert read_record(path, ExitRecord) == _record()
    assert not path.is_symlink()


def test_state_write_allows_symlinks_above_the_bundle(tmp_path: Path) -> None:
    # /var/lib/containerd linked to another disk is a normal host setup.
    real = tmp_path / "real"
    (real / "bundle").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(real)
    path = exit_record_path(str(tmp_path / "alias" / "bundle"), "c1")
    write_record(path, _record())
    assert read_record(real / "bundle" / "pyshim" / "exits" / "c1.json", ExitRecord) == _record()


def test_write_atomic_refuses_a_file_where_a_state_dir_belongs(tmp_path: Path) -> None:
    (tmp_path / "pyshim").write_text("not a dir")
    with pytest.raises(OSError):
        write_atomic(tmp_path / "pyshim" / "container.json", b"{}")
