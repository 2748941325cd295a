"""Every resource limit the shim enforces, and what exceeding it returns.

docs/reliability.md lists the same limits; a change to one of them must show here.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from protocol.proto.task.v2 import shim_pb2
from protocol.proto.ttrpc_pb2 import KeyValue
from protocol.ttrpc import Client, Method, RequestContext, Server
from protocol.ttrpc.frame import MAX_MESSAGE_SIZE, MessageType, encode_frame, encode_header
from protocol.ttrpc.messages import RequestMessage, decode_response, encode_request
from protocol.ttrpc.server import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_PARTIAL_FRAME_TIMEOUT,
    DEFAULT_WRITE_BUFFER_HIGH,
)
from protocol.ttrpc.status import Code, TtrpcError
from shim import daemon
from shim.io.stdio import InvalidStdioError, StdioSpec, open_process_io
from shim.records.state import (
    ExitLog,
    ExitRecord,
    RecordError,
    read_record,
    write_atomic,
    write_record,
)
from shim.records.statedir import UnsafePathError
from shim.task.container import MAX_EXECS_PER_CONTAINER
from shim.task.ids import MAX_LENGTH, InvalidIdentifierError, validate_id
from shim.task.service import SERVICE_NAMES, TaskService
from tests.unit.shim.task.test_service import FakeReaper, FakeRuntime, Harness, Shared, make_harness

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


def _record_path(bundle: Path) -> Path:
    return bundle / "pyshim" / "records" / "c1.json"


@pytest.mark.parametrize("link", ["pyshim", "pyshim/records"])
def test_state_write_refuses_a_symlinked_state_dir(tmp_path: Path, link: str) -> None:
    bundle, outside = tmp_path / "bundle", tmp_path / "outside"
    bundle.mkdir()
    outside.mkdir()
    if link == "pyshim/records":
        (bundle / "pyshim").mkdir()
    (bundle / link).symlink_to(outside)
    with pytest.raises(UnsafePathError):
        write_record(_record_path(bundle), _record())
    if link == "pyshim":
        with pytest.raises(UnsafePathError):
            ExitLog(str(bundle)).record(_record())
    assert list(outside.iterdir()) == []


def test_state_write_never_follows_a_planted_tmp_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = _record_path(tmp_path / "bundle")
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
    write_record(_record_path(tmp_path / "alias" / "bundle"), _record())
    assert read_record(_record_path(real / "bundle"), ExitRecord) == _record()
    exits = ExitLog(str(tmp_path / "alias" / "bundle"))
    exits.record(_record())
    exits.close()
    assert ExitLog.load(str(real / "bundle"), "c1")[1] == {"c1": _record()}


def test_write_atomic_refuses_a_file_where_a_state_dir_belongs(tmp_path: Path) -> None:
    (tmp_path / "pyshim").write_text("not a dir")
    with pytest.raises(OSError):
        write_atomic(tmp_path / "pyshim" / "container.json", b"{}")


def test_read_record_refuses_a_planted_symlink(tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    write_record(secret, _record())  # a valid record: following the link would "work"
    path = _record_path(tmp_path / "bundle")
    path.parent.mkdir(parents=True)
    path.symlink_to(secret)
    with pytest.raises(RecordError, match=r"refusing record .*c1\.json: it is a symlink"):
        read_record(path, ExitRecord)
    path.unlink()
    path.symlink_to(tmp_path / "dangling")
    with pytest.raises(RecordError, match="it is a symlink"):
        read_record(path, ExitRecord)


def test_read_record_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    path = _record_path(tmp_path)
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    with pytest.raises(RecordError, match="not a regular file"):
        read_record(path, ExitRecord)


# ------------------------------------------------------------------ execs per container


def _exec_request(exec_id: str) -> shim_pb2.ExecProcessRequest:
    spec = any_pb2.Any(type_url="p", value=json.dumps({"args": ["true"], "cwd": "/"}).encode())
    return shim_pb2.ExecProcessRequest(id="c1", exec_id=exec_id, spec=spec)


async def test_execs_per_container_are_capped(tmp_path: Path) -> None:
    assert MAX_EXECS_PER_CONTAINER == 1024
    h: Harness = make_harness(tmp_path)
    await h.create()
    for i in range(MAX_EXECS_PER_CONTAINER):
        await h.service.exec(_exec_request(f"e{i}"))
    published = len(h.publisher.events)
    with pytest.raises(TtrpcError) as err:
        await h.service.exec(_exec_request("extra"))
    assert err.value.code == Code.RESOURCE_EXHAUSTED
    assert err.value.message == (
        "container c1: too many execs (1024, at most 1024); delete finished execs first"
    )
    # Refused means refused: nothing registered, nothing published.
    assert len(h.publisher.events) == published
    with pytest.raises(TtrpcError) as missing:
        await h.state(exec_id="extra")
    assert missing.value.code == Code.NOT_FOUND
    # A deleted exec frees its slot.
    await h.service.delete(shim_pb2.DeleteRequest(id="c1", exec_id="e0"))
    await h.service.exec(_exec_request("extra"))
    assert (await h.state(exec_id="extra")).exec_id == "extra"


# ------------------------------------------------------------------ stdio strings

# (stdin, stdout, stderr, terminal) -> the InvalidArgument message
BAD_STDIO: dict[tuple[str, str, str, bool], str] = {
    ("", "out", "", False): "stdout 'out': must be an absolute path",
    ("", "/o", "err", False): "stderr 'err': must be an absolute path",
    ("in", "/o", "", False): "stdin 'in': must be an absolute path",
    ("in", "", "", True): "stdin 'in': must be an absolute path",
    ("", "./o", "", True): "stdout './o': must be an absolute path",
    ("", "fifo:///o", "", False): "stdout 'fifo:///o': must be an absolute path",
    ("", "file:log", "", False): "stdout 'file:log': the log file path must be absolute",
    ("", "file://", "", False): "stdout 'file://': the log file path must be absolute",
    ("", "file://var/x", "", False): (
        "stdout 'file://var/x': file:// needs an absolute log file path (file:///abs/path),"
        " not host 'var'"
    ),
    ("", "binary://log?a", "", False): (
        "stdout 'binary://log?a': binary:// needs an absolute logging binary path"
        " (binary:///abs/path), not host 'log'"
    ),
    ("", "binary:log", "", False): "stdout 'binary:log': the logging binary path must be absolute",
    ("", "/o\0x", "", False): "stdout '/o\\x00x': contains a NUL byte",
    ("/i\0", "/o", "", False): "stdin '/i\\x00': contains a NUL byte",
    # stderr is unused with file://, but a NUL is refused anywhere
    ("", "file:///o", "/e\0", False): "stderr '/e\\x00': contains a NUL byte",
    ("", "file:///o\0", "", False): "stdout 'file:///o\\x00': contains a NUL byte",
    ("", "file:///o%00", "", False): "stdout 'file:///o%00': contains an encoded NUL byte",
    ("", "binary:///l?k=%00", "", False): (
        "stdout 'binary:///l?k=%00': contains an encoded NUL byte"
    ),
    ("", "file://[x/o", "", False): "stdout 'file://[x/o': Invalid IPv6 URL",
}


@pytest.mark.parametrize(("strings", "message"), BAD_STDIO.items(), ids=repr)
async def test_unusable_stdio_strings_are_invalid_argument_and_open_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    strings: tuple[str, str, str, bool],
    message: str,
) -> None:
    spec = StdioSpec(*strings)
    monkeypatch.chdir(tmp_path)  # where a relative path would land
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(InvalidStdioError) as err:
        await open_process_io(spec, process_id="p1", namespace="ns", reaper=None)  # type: ignore[arg-type]
    assert (err.value.code, err.value.message) == (Code.INVALID_ARGUMENT, message)
    assert len(os.listdir("/proc/self/fd")) == fds
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "spec",
    [
        # ctr's --log-uri puts the same URI in stdout and stderr.
        StdioSpec("", "binary:///bin/true", "binary:///bin/true", False),
        # binary:// without a terminal never uses stdin.
        StdioSpec("unused", "binary:///bin/true", "", False),
        # with a terminal, stderr is never used.
        StdioSpec("", "/dev/null", "unused", True),
    ],
)
def test_stdio_strings_a_kind_does_not_use_are_not_path_checked(spec: StdioSpec) -> None:
    from shim.io.stdio import validate_spec

    validate_spec(spec)


async def test_stdio_refusals_reach_containerd_as_status_3(tmp_path: Path) -> None:
    # Through the real stdio opener and a real ttrpc server: the code on the wire.
    shared = Shared()
    service = TaskService(
        namespace="ns",
        publisher=(publisher := _Events()),
        reaper=FakeReaper(),  # type: ignore[arg-type]
        request_shutdown=lambda: None,
        make_runtime=lambda options, bundle: FakeRuntime(shared, bundle),
        mount=lambda mounts, target: None,
        unmount=lambda target: None,
    )
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "config.json").write_text("{}")
    server = Server()
    service.register(server)
    path = "\0pyshim-limits-" + uuid.uuid4().hex
    await server.serve_path(path)
    try:
        async with await Client.connect(path) as client:
            task = SERVICE_NAMES[0]
            create = shim_pb2.CreateTaskRequest(id="c1", bundle=str(bundle), stdout="rel/out")
            with pytest.raises(TtrpcError) as err:
                await client.call(task, "Create", create, shim_pb2.CreateTaskResponse, timeout=5)
            assert err.value.code == Code.INVALID_ARGUMENT
            assert err.value.message == "stdout 'rel/out': must be an absolute path"
            assert shared.names() == [] and publisher.events == []
            assert sorted(p.name for p in bundle.iterdir()) == ["config.json"]

            create = shim_pb2.CreateTaskRequest(id="c1", bundle=str(bundle))
            await client.call(task, "Create", create, shim_pb2.CreateTaskResponse, timeout=5)
            exec_ = _exec_request("e1")
            exec_.stdout = "/dev/null\0"
            await client.call(task, "Exec", exec_, shim_pb2.CreateTaskResponse, timeout=5)
            start = shim_pb2.StartRequest(id="c1", exec_id="e1")
            with pytest.raises(TtrpcError) as err:
                await client.call(task, "Start", start, shim_pb2.StartResponse, timeout=5)
            assert err.value.code == Code.INVALID_ARGUMENT
            assert "contains a NUL byte" in err.value.message
            assert "exec" not in shared.names()
            state = shim_pb2.StateRequest(id="c1", exec_id="e1")
            st = await client.call(task, "State", state, shim_pb2.StateResponse, timeout=5)
            assert st.pid == 0  # still created
    finally:
        server.close()
        service.close()


class _Events:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def publish(self, topic: str, event: object) -> None:
        self.events.append((topic, event))


# ------------------------------------------------------------------ stalled partial frames


def _stall_timers(server: Server) -> list[asyncio.TimerHandle]:
    return [c._stall_timer for c in server._conns if c._stall_timer is not None]


async def _until_connections(server: Server, n: int) -> None:
    async with asyncio.timeout(5):
        while server.connection_count != n:
            await asyncio.sleep(0.01)


async def _open_admitted(server: Server, path: str) -> Raw:
    # The client's connect returns before the server has accepted.
    before = server.connection_count
    raw = await Raw.open(path)
    await _until_connections(server, before + 1)
    return raw


def test_partial_frame_timeout_default() -> None:
    assert DEFAULT_PARTIAL_FRAME_TIMEOUT == 30.0
    assert Server().partial_frame_timeout == 30.0
    with pytest.raises(ValueError):
        Server(partial_frame_timeout=0)


@pytest.mark.parametrize("sent", ["half a header", "all but 2 bytes", "oversized header"])
async def test_a_partial_frame_that_stalls_is_closed_after_the_bound(
    sent: str, caplog: pytest.LogCaptureFixture
) -> None:
    frame = request(1, "Size", KeyValue(value="x" * 100))
    part = {
        "half a header": frame[:5],
        "all but 2 bytes": frame[:-2],
        # Being skipped (never buffered) still counts as inside a frame.
        "oversized header": encode_header(5 << 20, 1, MessageType.REQUEST) + b"x" * 1000,
    }[sent]
    async with serving(partial_frame_timeout=0.3) as (server, _svc, path):
        raw = await _open_admitted(server, path)
        try:
            start = time.monotonic()
            await raw.send(part)
            await _until_connections(server, 0)
            assert 0.25 < time.monotonic() - start < 3
            assert await raw.closed_with_nothing_sent()
            assert "peer stalled inside a frame for 0.3s" in caplog.text
        finally:
            raw.close()


async def test_the_bound_runs_from_the_first_byte_of_the_frame() -> None:
    # One byte every 50 ms keeps arriving, but the frame is not done within the bound.
    frame = request(1, "Size", KeyValue(value="x" * 100))
    async with serving(partial_frame_timeout=0.4) as (server, _svc, path):
        raw = await _open_admitted(server, path)
        try:
            start = time.monotonic()
            for byte in frame[:-1]:
                if not server.connection_count:
                    break
                raw.writer.write(bytes([byte]))
                await asyncio.sleep(0.05)
            await _until_connections(server, 0)
            # Had each byte restarted the clock it would have taken the whole ~6 s.
            assert 0.35 < time.monotonic() - start < 1.5
        finally:
            raw.close()


async def test_a_slow_frame_completed_within_the_bound_is_answered() -> None:
    frame = request(1, "Size", KeyValue(value="v" * (1 << 20)))
    async with serving(partial_frame_timeout=2.0) as (server, _svc, path):
        raw = await _open_admitted(server, path)
        try:
            for i in range(0, len(frame), 64 << 10):
                await raw.send(frame[i : i + (64 << 10)])
                await asyncio.sleep(0.02)
            sid, _, data = await raw.read_frame()
            assert (sid, KeyValue.FromString(decode_response(data).payload).key) == (1, "1048576")
            assert _stall_timers(server) == []
            # Frames that each complete reset it: the bound is per frame, not per connection.
            for sid in (3, 5, 7):
                one = request(sid, "Size", KeyValue(value="ab"))
                await raw.send(one[:7])
                await asyncio.sleep(0.9)
                await raw.send(one[7:])
                assert (await raw.read_frame())[0] == sid
            assert server.connection_count == 1
        finally:
            raw.close()


async def test_an_idle_connection_arms_no_timer_and_stays_open() -> None:
    frame = request(3, "Size", KeyValue(value="ab"))
    async with serving(partial_frame_timeout=0.2) as (server, _svc, path):
        raw = await _open_admitted(server, path)
        try:
            assert _stall_timers(server) == []
            await raw.send(request(1, "Size", KeyValue(value="a")))
            assert (await raw.read_frame())[0] == 1
            assert _stall_timers(server) == []
            await asyncio.sleep(0.5)
            assert server.connection_count == 1
            await raw.send(frame[:5])
            await asyncio.sleep(0.05)
            assert len(_stall_timers(server)) == 1
            await raw.send(frame[5:])
            assert (await raw.read_frame())[0] == 3
            assert _stall_timers(server) == []
        finally:
            raw.close()


async def test_a_partial_frame_behind_a_call_in_flight_is_not_timed() -> None:
    # The peer may be waiting on us; the bound starts once nothing of ours is pending.
    async with serving(partial_frame_timeout=0.2) as (server, svc, path):
        raw = await _open_admitted(server, path)
        try:
            await raw.send(request(1, "Block", KeyValue(key="b")))
            async with asyncio.timeout(5):
                while not svc.started:
                    await asyncio.sleep(0.005)
            await raw.send(request(3, "Size", KeyValue(value="x"))[:5])
            await asyncio.sleep(0.5)
            assert (server.connection_count, _stall_timers(server)) == (1, [])
            svc.gate.set()
            assert (await raw.read_frame())[0] == 1
            start = time.monotonic()
            await _until_connections(server, 0)
            assert 0.15 < time.monotonic() - start < 3
        finally:
            raw.close()


def test_manager_api_admits_root_our_user_and_the_configured_group_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import grp
    import pwd

    from manager import daemon as manager_daemon

    # /etc/passwd and /etc/group as the check sees them: "alice" (uid 5001, primary
    # gid 5001) is a listed member of group 7000; "bob" (5002) is not.
    users = {5001: "alice", 5002: "bob"}

    def getpwuid(uid: int) -> pwd.struct_passwd:
        if uid not in users:
            raise KeyError(uid)
        return pwd.struct_passwd((users[uid], "x", uid, uid, "", "/", "/bin/sh"))

    def getgrgid(gid: int) -> grp.struct_group:
        if gid != 7000:
            raise KeyError(gid)
        return grp.struct_group(("devs", "x", 7000, ["alice"]))

    monkeypatch.setattr(pwd, "getpwuid", getpwuid)
    monkeypatch.setattr(grp, "getgrgid", getgrgid)

    uid, gid = os.geteuid(), os.getegid()
    root_only = manager_daemon.api_peer_check(None)
    assert root_only(1, 0, 12345)
    assert root_only(1, uid, gid)
    assert not root_only(1, 65534, 65534)
    assert not root_only(1, 5001, 5001)

    with_group = manager_daemon.api_peer_check(7000)
    assert with_group(1, 0, 12345)
    assert with_group(1, 5002, 7000)  # primary gid is the group
    assert with_group(1, 5001, 5001)  # member through the group's list
    assert not with_group(1, 5002, 5002)
    assert not with_group(1, 65534, 65534)  # unknown user
