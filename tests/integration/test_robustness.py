"""A real shim daemon (started through `start`) against misbehaving local clients.

In every case: another client's Connect still answers promptly, the daemon's open fds
return to their baseline, its RSS stays bounded, and it is still alive. The peer
credential test connects as uid 65534 and must be closed with nothing sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from crashtest.images import write_oci_bundle
from protocol import wire
from protocol.proto import anyutil
from protocol.proto.runc import options_pb2
from protocol.proto.runtime.bootstrap.v1 import bootstrap_pb2
from protocol.proto.task.v2 import shim_pb2
from protocol.ttrpc.client import Client
from protocol.ttrpc.frame import MAX_MESSAGE_SIZE, MessageType, encode_frame, encode_header
from protocol.ttrpc.messages import RequestMessage, decode_response, encode_request
from protocol.ttrpc.status import Code, ConnectionClosedError
from tests.support.template import stop_templates

pytestmark = pytest.mark.integration

TASK = "containerd.task.v2.Task"
NAMESPACE = "robustness"
# "Promptly" on a loaded 2-core CI box.
PROMPT = 2.0
# Growth of the daemon's RSS any single abuse may cause.
RSS_BUDGET_KB = 48 * 1024
NOBODY = 65534
CGROUP_PARENT = "pyshim-rb"


def _binary() -> str:
    here = Path(sys.executable).parent / "containerd-shim-pyshim-v1"
    found = str(here) if here.exists() else shutil.which("containerd-shim-pyshim-v1")
    if found is None:
        pytest.fail("containerd-shim-pyshim-v1 is not installed (venv or PATH)", pytrace=False)
    return found


def _connect_frame(sid: int, cid: str = "") -> bytes:
    payload = shim_pb2.ConnectRequest(id=cid).SerializeToString()
    return encode_frame(
        sid, MessageType.REQUEST, encode_request(RequestMessage(TASK, "Connect", payload))
    )


class Shim:
    """One daemon started the way containerd does, in a private temp dir."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="pyshim-rb-", dir="/tmp"))
        self.id = "rb" + self.tmp.name.rsplit("-", 1)[-1].lower().replace("_", "0")
        self.bundle = self.tmp / "bundle"
        # A container the daemon serves through the whole module: an empty shim leaves
        # by itself after 10 s, and under load a module takes longer than that.
        write_oci_bundle(self.bundle, ["sleep", "3600"], cgroups_path=f"/{CGROUP_PARENT}/{self.id}")
        self.runc_root = self.tmp / "runc"
        os.mkfifo(self.bundle / "log", 0o600)
        # containerd holds the log fifo read-write and non-blocking; so do we.
        self.log_fd = os.open(self.bundle / "log", os.O_RDWR | os.O_NONBLOCK)
        self.socket_dir = self.tmp / "s"
        self.pid = 0
        self.socket_path = ""
        self._log = ""

    def start(self) -> None:
        # containerd 2.3's BootstrapParams (id, namespace, socket_dir) keeps the socket
        # in our temp dir instead of /run/containerd/s.
        params = (
            wire.field_str(1, self.id)
            + wire.field_str(2, NAMESPACE)
            + wire.field_str(9, str(self.socket_dir))
        )
        argv = [
            _binary(),
            "-namespace", NAMESPACE,
            "-address", str(self.tmp / "fake.sock"),
            "-id", self.id,
            "start",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "TTRPC_ADDRESS"}
        # Our own shim fork template, so stop() can stop it.
        env["PYSHIM_TEMPLATE_DIR"] = str(self.tmp / "template")
        done = subprocess.run(
            argv,
            cwd=self.bundle,
            input=params,
            capture_output=True,
            env=env,
            timeout=30,
            process_group=0,
        )
        if done.returncode != 0:
            pytest.fail(f"shim start failed ({done.returncode}): {done.stderr!r}", pytrace=False)
        # BootstrapParams in, so a BootstrapResult out (shim/bootstrap.py).
        address = bootstrap_pb2.BootstrapResult.FromString(done.stdout).address
        assert address.startswith(f"unix://{self.socket_dir}/"), address
        self.socket_path = address.removeprefix("unix://")

    async def run_container(self) -> None:
        options = anyutil.pack(options_pb2.Options(root=str(self.runc_root)))
        async with await Client.connect(self.socket_path, timeout=PROMPT) as client:
            req = shim_pb2.CreateTaskRequest(id=self.id, bundle=str(self.bundle), options=options)
            await client.call(TASK, "Create", req, shim_pb2.CreateTaskResponse, timeout=60)
            start = shim_pb2.StartRequest(id=self.id)
            await client.call(TASK, "Start", start, shim_pb2.StartResponse, timeout=60)

    async def remove_container(self) -> None:
        async with await Client.connect(self.socket_path, timeout=PROMPT) as client:
            kill = shim_pb2.KillRequest(id=self.id, signal=signal.SIGKILL, all=True)
            with contextlib.suppress(Exception):
                await client.call(TASK, "Kill", kill, empty_pb2.Empty, timeout=30)
            wait = shim_pb2.WaitRequest(id=self.id)
            with contextlib.suppress(Exception):
                await client.call(TASK, "Wait", wait, shim_pb2.WaitResponse, timeout=30)
            delete = shim_pb2.DeleteRequest(id=self.id)
            await client.call(TASK, "Delete", delete, shim_pb2.DeleteResponse, timeout=30)

    async def connect(self) -> shim_pb2.ConnectResponse:
        async with asyncio.timeout(PROMPT):
            client = await Client.connect(self.socket_path)
            try:
                return await client.call(
                    TASK, "Connect", shim_pb2.ConnectRequest(), shim_pb2.ConnectResponse
                )
            finally:
                client.close()

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def alive(self) -> bool:
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        return state != "Z"

    def log(self) -> str:
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self.log_fd, 65536):
                self._log += data.decode(errors="replace")
        return self._log

    def stop(self) -> None:
        try:
            if self.pid and self.alive():
                # Cleanup must go on whatever the RPC does; the signals below back it up.
                with contextlib.suppress(Exception):
                    asyncio.run(self.remove_container())
                with contextlib.suppress(Exception):
                    asyncio.run(self._shutdown())
                if not self._wait_gone(5):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGTERM)
                    if not self._wait_gone(5):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(self.pid, signal.SIGKILL)
                        self._wait_gone(5)
        finally:
            os.close(self.log_fd)
            stop_templates(self.tmp / "template")
            # Whatever the shim could not remove (it was killed): the container first.
            subprocess.run(["runc", "--root", str(self.runc_root / NAMESPACE), "delete",
                            "--force", self.id], capture_output=True, check=False)  # fmt: skip
            root = Path("/sys/fs/cgroup")
            for parent in [root / CGROUP_PARENT, *root.glob(f"*/{CGROUP_PARENT}")]:
                for d in (parent / self.id, parent):  # the parent stays while others use it
                    with contextlib.suppress(OSError):
                        d.rmdir()
            with contextlib.suppress(OSError):
                (self.bundle / "rootfs").rmdir()  # unmounted: runc mounted nothing there
            shutil.rmtree(self.tmp, ignore_errors=True)

    async def _shutdown(self) -> None:
        async with asyncio.timeout(PROMPT):
            client = await Client.connect(self.socket_path)
            try:
                await client.call(TASK, "Shutdown", shim_pb2.ShutdownRequest(), empty_pb2.Empty)
            finally:
                client.close()

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return True
            time.sleep(0.05)
        return False


@pytest.fixture(scope="module")
def shim() -> Iterator[Shim]:
    s = Shim()
    try:
        s.start()
        asyncio.run(s.run_container())
        s.pid = asyncio.run(s.connect()).shim_pid
        s.log()
        assert s.pid > 0 and s.alive()
        yield s
    finally:
        s.stop()


@pytest.fixture
def baseline(shim: Shim) -> Iterator[tuple[int, int]]:
    """(fds, rss) before the test; afterwards the daemon must be back to those fds."""
    if not shim.alive():
        pytest.fail("shim daemon died in an earlier test", pytrace=False)
    fds = _settled_fds(shim)
    yield fds, shim.rss_kb()
    assert shim.alive(), shim.log()[-4000:]
    _assert_fds_return(shim, fds)


def _settled_fds(shim: Shim) -> int:
    last, stable_since = shim.fds(), time.monotonic()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and time.monotonic() - stable_since < 0.3:
        time.sleep(0.05)
        now = shim.fds()
        if now != last:
            last, stable_since = now, time.monotonic()
    return last


def _assert_fds_return(shim: Shim, fds: int) -> None:
    deadline = time.monotonic() + 10
    while shim.fds() > fds and time.monotonic() < deadline:
        time.sleep(0.05)
    assert shim.fds() <= fds, f"daemon holds {shim.fds()} fds, baseline {fds}"


async def _assert_prompt(shim: Shim) -> None:
    start = time.monotonic()
    resp = await shim.connect()
    assert resp.shim_pid == shim.pid
    assert time.monotonic() - start < PROMPT


@asynccontextmanager
async def raw_conn(shim: Shim) -> AsyncIterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, shim.socket_path)
        yield sock
    finally:
        sock.close()


async def _read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    loop = asyncio.get_running_loop()

    async def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = await loop.sock_recv(sock, n - len(buf))
            assert chunk, "connection closed"
            buf += chunk
        return buf

    async with asyncio.timeout(PROMPT * 2):
        head = await exactly(10)
        length = int.from_bytes(head[:4], "big")
        return int.from_bytes(head[4:8], "big"), head[8], await exactly(length)


async def _send(sock: socket.socket, data: bytes) -> None:
    async with asyncio.timeout(PROMPT * 5):
        await asyncio.get_running_loop().sock_sendall(sock, data)


# ------------------------------------------------------------------ the socket itself


def test_socket_is_owner_only(shim: Shim) -> None:
    mode = os.stat(shim.socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600, oct(mode)


_AS_NOBODY = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit(0)
s.settimeout(5)
try:
    s.sendall(bytes.fromhex(sys.argv[2]))
    data = s.recv(1)
except (ConnectionResetError, BrokenPipeError):
    data = b""
print("CLOSED" if data == b"" else "ANSWERED")
"""


def _as_nobody(shim: Shim) -> str:
    # Our venv's interpreter lives under /root; nobody can only run the system one.
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.fail("/usr/bin/python3 is needed to run a client as nobody", pytrace=False)
    done = subprocess.run(
        [python, "-c", _AS_NOBODY, shim.socket_path, _connect_frame(1).hex()],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        timeout=20,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().strip()


async def test_other_uid_is_refused_by_mode_then_by_peer_credentials(
    shim: Shim, baseline: tuple[int, int]
) -> None:
    shim.log()
    dirs = [shim.tmp, shim.socket_dir]
    saved = {p: stat.S_IMODE(os.stat(p).st_mode) for p in [*dirs, Path(shim.socket_path)]}
    try:
        for d in dirs:
            os.chmod(d, 0o711)
        # 0600 alone keeps another uid out.
        assert _as_nobody(shim) == "EACCES"
        # With the mode opened up, SO_PEERCRED must still refuse: closed, nothing sent.
        os.chmod(shim.socket_path, 0o666)
        assert _as_nobody(shim) == "CLOSED"
    finally:
        for path, mode in saved.items():
            os.chmod(path, mode)
    await _assert_prompt(shim)
    deadline = time.monotonic() + 5
    while "refusing connection from peer" not in shim.log() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    lines = [ln for ln in shim.log().splitlines() if "refusing connection from peer" in ln]
    assert lines and f"{NOBODY}, {NOBODY})" in lines[-1], shim.log()[-2000:]


# ------------------------------------------------------------------ abuse


async def test_half_frame_then_stall(shim: Shim, baseline: tuple[int, int]) -> None:
    frame = _connect_frame(1)
    async with raw_conn(shim) as header_only, raw_conn(shim) as half_data:
        await _send(header_only, frame[:5])
        await _send(half_data, frame[: len(frame) - 2])
        await asyncio.sleep(0.2)
        await _assert_prompt(shim)
        # The stalled frame completes late and is answered normally.
        await _send(half_data, frame[len(frame) - 2 :])
        sid, _, data = await _read_frame(half_data)
        assert sid == 1 and decode_response(data).code == 0
    assert shim.alive()


async def test_flooding_client_that_never_reads(shim: Shim, baseline: tuple[int, int]) -> None:
    _, rss0 = baseline
    batch = b"".join(_connect_frame(1 + 2 * i) for i in range(2000))
    async with raw_conn(shim) as flood:
        sent = 0
        # Resume mid-frame after a partial send: restarting the batch would desync the
        # stream into garbage headers, which the daemon cheaply skips as oversized.
        pending = memoryview(batch)
        deadline = time.monotonic() + 60
        blocked_since: float | None = None
        while time.monotonic() < deadline:
            try:
                n = flood.send(pending)
            except BlockingIOError:
                # Kernel buffers and the daemon's write buffer full: it must have
                # stopped reading us. Stalled for a whole second = done.
                blocked_since = blocked_since or time.monotonic()
                if time.monotonic() - blocked_since > 1.0:
                    break
                await asyncio.sleep(0.05)
                continue
            blocked_since = None
            sent += n
            pending = pending[n:] or memoryview(batch)
        assert time.monotonic() < deadline, f"the daemon kept reading ({sent} bytes)"
        # Answers it could not write are bounded by the 1 MiB write buffer, so roughly
        # that plus kernel buffers worth of requests got in.
        assert sent < 64 << 20, sent
        await _assert_prompt(shim)
        assert shim.rss_kb() - rss0 < RSS_BUDGET_KB, (shim.rss_kb(), rss0, sent)
    await _assert_prompt(shim)


async def test_thousand_connections_opened_and_dropped(
    shim: Shim, baseline: tuple[int, int]
) -> None:
    _, rss0 = baseline
    loop = asyncio.get_running_loop()
    frame = _connect_frame(1)
    refused: list[int] = []

    async def one(i: int) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, shim.socket_path)
            if i % 3 == 1:
                await loop.sock_sendall(sock, frame)
            elif i % 3 == 2:
                await loop.sock_sendall(sock, frame[:7])
        except OSError as exc:
            # Beyond the connection cap the daemon aborts us at once: allowed.
            if not isinstance(exc, ConnectionError) and exc.errno != errno.ENOTCONN:
                raise
            refused.append(i)
        finally:
            sock.close()

    # containerd keeps its connection open; the churn must not disturb it.
    held = await Client.connect(shim.socket_path)
    try:
        for start in range(0, 1000, 50):
            await asyncio.gather(*(one(i) for i in range(start, start + 50)))
            resp = await held.call(
                TASK, "Connect", shim_pb2.ConnectRequest(), shim_pb2.ConnectResponse, timeout=PROMPT
            )
            assert resp.shim_pid == shim.pid
    finally:
        held.close()
    # 50 at a time, yet the cap (128) is hit now and then: the daemon accepts a burst
    # before it has seen the earlier ones' EOF. Most must still get in.
    assert len(refused) < 500, len(refused)
    # A new connection may meet the cap until the daemon has seen the burst's EOFs;
    # it must be admitted again within PROMPT.
    deadline = time.monotonic() + PROMPT
    while True:
        try:
            await _assert_prompt(shim)
            break
        except ConnectionClosedError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    assert shim.rss_kb() - rss0 < RSS_BUDGET_KB


async def test_malformed_frames_mid_stream(shim: Shim, baseline: tuple[int, int]) -> None:
    async with raw_conn(shim) as sock:
        await _send(sock, _connect_frame(1))
        assert (await _read_frame(sock))[0] == 1
        bad_envelope = encode_header(3, 3, MessageType.REQUEST) + b"\xff\xff\xff"
        bad_payload = encode_frame(
            5,
            MessageType.REQUEST,
            encode_request(RequestMessage(TASK, "Connect", b"\x0a\xff\xff")),
        )
        unknown_type = encode_frame(7, 0x7F, b"whatever")
        even_id = _connect_frame(8)
        await _send(sock, bad_envelope + bad_payload + unknown_type + even_id + _connect_frame(9))
        answers = {}
        for _ in range(4):
            sid, type_, data = await _read_frame(sock)
            assert type_ == MessageType.RESPONSE
            answers[sid] = decode_response(data).code
        assert answers == {
            3: Code.INVALID_ARGUMENT,
            5: Code.INTERNAL,
            8: Code.INVALID_ARGUMENT,
            9: Code.OK,
        }
        await _assert_prompt(shim)


async def test_oversized_length_headers(shim: Shim, baseline: tuple[int, int]) -> None:
    _, rss0 = baseline
    async with raw_conn(shim) as sock, raw_conn(shim) as stalled:
        # Claims 4 GiB and sends a little: the daemon must not wait-and-buffer it.
        await _send(stalled, encode_header(0xFFFF_FFFF, 1, MessageType.REQUEST) + b"\0" * 4096)
        # Just over the limit, fully sent: answered 8 on its stream, stream stays in sync.
        over = MAX_MESSAGE_SIZE + 1
        await _send(sock, encode_header(over, 3, MessageType.REQUEST) + b"\0" * over)
        sid, _, data = await _read_frame(sock)
        resp = decode_response(data)
        assert (sid, resp.code) == (3, Code.RESOURCE_EXHAUSTED)
        assert resp.message == f"message length {over} exceed maximum message size of 4194304"
        await _send(sock, _connect_frame(5))
        assert (await _read_frame(sock))[0] == 5
        # 16 MiB more into the 4 GiB frame is thrown away, not kept.
        chunk = b"\0" * (1 << 20)
        for _ in range(16):
            await _send(stalled, chunk)
        await _assert_prompt(shim)
        assert shim.rss_kb() - rss0 < RSS_BUDGET_KB, (shim.rss_kb(), rss0)
