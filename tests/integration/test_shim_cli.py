"""The shim binary as containerd runs it: `start`, the daemon it leaves behind, `delete`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from protocol.proto.task.v2 import shim_pb2
from protocol.ttrpc.client import Client
from shim.boot.start import socket_address
from tests.support.containerd import Containerd
from tests.support.hosts import every_host

pytestmark = pytest.mark.integration

TASK_SERVICE = "containerd.task.v2.Task"
GROUP = "io.containerd.pyshim.v1.group"


def _binary(ctrd: Containerd) -> str:
    found = shutil.which("containerd-shim-pyshim-v1", path=ctrd.env()["PATH"])
    if found is None:
        pytest.fail("containerd-shim-pyshim-v1 not on the venv PATH", pytrace=False)
    return found


class Bundle:
    """A bundle dir as containerd prepares it before `start`: config.json and the log fifo."""

    def __init__(self, ctrd: Containerd, cid: str, annotations: dict[str, str] | None = None):
        self.ctrd = ctrd
        self.id = cid
        self.path = ctrd.tmp / "bundles" / cid
        self.path.mkdir(parents=True)
        spec: dict[str, object] = {"ociVersion": "1.0.2"}
        if annotations:
            spec["annotations"] = annotations
        (self.path / "config.json").write_text(json.dumps(spec))
        os.mkfifo(self.path / "log", 0o700)
        # containerd keeps the fifo open read-write and non-blocking.
        self.log_fd = os.open(self.path / "log", os.O_RDWR | os.O_NONBLOCK)

    def argv(self, *extra: str) -> list[str]:
        return [
            _binary(self.ctrd),
            "-namespace", self.ctrd.namespace,
            "-address", self.ctrd.address,
            "-publish-binary", shutil.which("containerd") or "containerd",
            "-id", self.id,
            *extra,
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        env = self.ctrd.env()
        env["TTRPC_ADDRESS"] = self.ctrd.ttrpc_address
        env["GOMAXPROCS"] = "2"
        return env

    def start(self, *, debug: bool = True) -> subprocess.CompletedProcess[bytes]:
        argv = self.argv("-debug", "start") if debug else self.argv("start")
        return subprocess.run(
            argv,
            cwd=self.path,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            process_group=0,
        )

    def read_log(self) -> str:
        chunks = []
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self.log_fd, 65536):
                chunks.append(data)
        return b"".join(chunks).decode(errors="replace")

    def close(self) -> None:
        os.close(self.log_fd)


@pytest.fixture
def bundles(containerd: Containerd) -> Iterator[list[Bundle]]:
    made: list[Bundle] = []
    yield made
    for b in made:
        b.close()


def _daemons(ctrd: Containerd) -> list[int]:
    """Shim daemons of this containerd: shim processes with no action argument."""
    pids = []
    for pid in ctrd.shim_pids():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        if argv and argv[-1] not in (b"start", b"delete"):
            pids.append(pid)
    return pids


def _related(ctrd: Containerd) -> str:
    """Every process naming this containerd's socket or template dir, for a failure
    message: which of them is there when a daemon is not."""
    marks = (ctrd.address.encode(), str(ctrd.template_dir).encode())
    lines = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if any(m in cmdline or m in environ for m in marks):
            argv = cmdline.replace(b"\0", b" ").decode(errors="replace")
            lines.append(f"{entry}: {argv}")
    return "\n".join(lines) or "(none)"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            pytest.fail(f"process {pid} still alive after {timeout}s")
        time.sleep(0.05)


async def _connect(address: str, cid: str) -> shim_pb2.ConnectResponse:
    path = address.removeprefix("unix://")
    # Bounds, not paces: a re-executed daemon's first answer took over 5 s in a loaded
    # User-Mode Linux guest (sid, VM tier).
    async with await Client.connect(path, timeout=30) as client:
        return await client.call(
            TASK_SERVICE, "Connect", shim_pb2.ConnectRequest(id=cid),
            shim_pb2.ConnectResponse, timeout=30,
        )  # fmt: skip


async def _shutdown(address: str, cid: str) -> None:
    path = address.removeprefix("unix://")
    async with await Client.connect(path, timeout=5) as client:
        # The daemon may close the connection before answering; both are success.
        with contextlib.suppress(Exception):
            await client.call(
                TASK_SERVICE, "Shutdown", shim_pb2.ShutdownRequest(id=cid),
                empty_pb2.Empty, timeout=5,
            )  # fmt: skip


def _fd_flags(pid: int, fd: int) -> int:
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


async def test_start_launches_daemon(containerd: Containerd, bundles: list[Bundle]) -> None:
    b = Bundle(containerd, "c1")
    bundles.append(b)
    # capture_output + a timeout: a daemon holding start's pipes would hang this.
    res = await asyncio.to_thread(b.start)
    expected = socket_address(containerd.address, containerd.namespace, "c1")
    assert res.returncode == 0, res.stderr
    assert res.stderr == b""
    assert res.stdout.decode() == expected
    assert (b.path / "address").read_text() == expected

    path = expected.removeprefix("unix://")
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600

    (pid,) = _daemons(containerd)
    resp = await _connect(expected, "c1")
    assert resp.shim_pid == pid
    assert resp.task_pid == 0

    assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] == "1"  # PPID
    assert os.getpgid(pid) == pid
    assert os.getsid(pid) == os.getsid(0)
    assert os.readlink(f"/proc/{pid}/cwd") == str(b.path)
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/1") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/2") == str(b.path / "log")
    assert os.readlink(f"/proc/{pid}/fd/3").startswith("socket:")
    assert _fd_flags(pid, 3) & os.O_CLOEXEC
    ours = int(Path("/proc/self/oom_score_adj").read_text())
    assert int(Path(f"/proc/{pid}/oom_score_adj").read_text()) == min(ours + 1, 1000)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    assert b"-debug" in argv and b"start" not in argv

    log = b.read_log()
    assert 'msg="starting signal loop"' in log
    assert f"namespace={containerd.namespace}" in log

    await _shutdown(expected, "c1")
    await asyncio.to_thread(_wait_gone, pid)
    assert not os.path.exists(path)


async def test_grouped_starts_share_one_daemon(
    containerd: Containerd, bundles: list[Bundle]
) -> None:
    b1 = Bundle(containerd, "c1", {GROUP: "g1"})
    b2 = Bundle(containerd, "c2", {GROUP: "g1"})
    bundles += [b1, b2]
    r1 = await asyncio.to_thread(b1.start)
    r2 = await asyncio.to_thread(b2.start)
    assert (r1.returncode, r2.returncode, r1.stderr, r2.stderr) == (0, 0, b"", b"")
    expected = socket_address(containerd.address, containerd.namespace, "g1")
    assert r1.stdout.decode() == r2.stdout.decode() == expected
    assert (b2.path / "address").read_text() == expected
    assert len(_daemons(containerd)) == 1
    sandbox = Bundle(containerd, "c3", {"io.kubernetes.cri.sandbox-id": "g1"})
    bundles.append(sandbox)
    r3 = await asyncio.to_thread(sandbox.start)
    assert r3.stdout.decode() == expected
    assert len(_daemons(containerd)) == 1


async def test_concurrent_starts_of_one_group(
    containerd: Containerd, bundles: list[Bundle]
) -> None:
    group = [Bundle(containerd, f"k{i}", {GROUP: "race"}) for i in range(4)]
    bundles += group
    results = await asyncio.gather(*(asyncio.to_thread(b.start) for b in group))
    expected = socket_address(containerd.address, containerd.namespace, "race")
    assert [r.returncode for r in results] == [0] * 4
    assert {r.stdout.decode() for r in results} == {expected}
    assert len(_daemons(containerd)) == 1, _related(containerd)


async def test_stale_socket_gets_new_daemon(containerd: Containerd, bundles: list[Bundle]) -> None:
    b = Bundle(containerd, "c1")
    bundles.append(b)
    assert (await asyncio.to_thread(b.start)).returncode == 0
    (pid,) = _daemons(containerd)
    os.kill(pid, signal.SIGKILL)  # leaves its socket file behind
    await asyncio.to_thread(_wait_gone, pid)
    address = (b.path / "address").read_text()
    assert os.path.exists(address.removeprefix("unix://"))
    res = await asyncio.to_thread(b.start)
    assert res.returncode == 0 and res.stdout.decode() == address
    (new_pid,) = _daemons(containerd)
    assert new_pid != pid
    assert (await _connect(address, "c1")).shim_pid == new_pid


async def test_sigterm_stops_daemon_and_removes_socket(
    containerd: Containerd, bundles: list[Bundle]
) -> None:
    b = Bundle(containerd, "c1")
    bundles.append(b)
    res = await asyncio.to_thread(b.start, debug=False)
    assert res.returncode == 0
    (pid,) = _daemons(containerd)
    await _connect(res.stdout.decode(), "c1")
    os.kill(pid, signal.SIGTERM)
    await asyncio.to_thread(_wait_gone, pid)
    assert not os.path.exists(res.stdout.decode().removeprefix("unix://"))
    assert "shutting down" in b.read_log()


async def test_daemon_does_not_depend_on_bundle(
    containerd: Containerd, bundles: list[Bundle]
) -> None:
    # Grouped shims outlive the first bundle; shutdown must use the remembered socket.
    b = Bundle(containerd, "c1")
    bundles.append(b)
    res = await asyncio.to_thread(b.start)
    address = res.stdout.decode()
    (pid,) = _daemons(containerd)
    await _connect(address, "c1")
    b.close()
    bundles.remove(b)
    shutil.rmtree(b.path)
    assert (await _connect(address, "c1")).shim_pid == pid
    await _shutdown(address, "c1")
    await asyncio.to_thread(_wait_gone, pid)
    assert not os.path.exists(address.removeprefix("unix://"))


def test_start_without_config_fails_cleanly(containerd: Containerd, tmp_path: Path) -> None:
    bundle = containerd.tmp / "bundles" / "nocfg"
    bundle.mkdir(parents=True)
    b_argv = [
        _binary(containerd), "-namespace", containerd.namespace,
        "-address", containerd.address, "-id", "nocfg", "start",
    ]  # fmt: skip
    res = subprocess.run(b_argv, cwd=bundle, capture_output=True, timeout=30, check=False)
    assert res.returncode == 1
    assert res.stdout == b""
    assert res.stderr.startswith(b"io.containerd.pyshim.v1: ")
    assert _daemons(containerd) == []


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_delete_without_bundle_twice(containerd: Containerd, where: str) -> None:
    base = containerd.tmp / "del"
    base.mkdir()
    bundle = base / "c9"
    if where == "empty":
        bundle.mkdir()
    argv = [
        _binary(containerd), "-namespace", containerd.namespace,
        "-address", containerd.address, "-publish-binary", "/usr/bin/containerd",
        "-id", "c9", "-bundle", str(bundle), "delete",
    ]  # fmt: skip
    for _ in range(2):
        res = subprocess.run(
            argv, cwd=base, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False
        )
        assert res.returncode == 0, res.stderr
        resp = shim_pb2.DeleteResponse.FromString(res.stdout)
        assert resp.exit_status == 137 and resp.pid == 0
        assert abs(resp.exited_at.seconds - time.time()) < 60
        # Nothing but the message: re-encoding gives the same bytes.
        assert resp.SerializeToString() == res.stdout


# -- driven by containerd itself ---------------------------------------------------------

RUNTIME = "io.containerd.pyshim.v1"


@every_host
def test_ctr_run_rm(containerd: Containerd, busybox_image: str) -> None:
    res = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, busybox_image, "c1", "echo", "hello", timeout=60
    )
    assert res.stdout == "hello\n"
    deadline = time.monotonic() + 10
    while _daemons(containerd):
        if time.monotonic() > deadline:
            pytest.fail(f"shim daemons left after ctr run --rm: {_daemons(containerd)}")
        time.sleep(0.05)
    log = containerd.log_text()
    assert "failed to delete" not in log
    assert "cleanup warnings" not in log or "level=warning" not in log
    # The daemon removed its socket (containerd 2.3: in the socket_dir it was given).
    sock = socket_address(containerd.address, containerd.namespace, "c1", containerd.socket_dir)
    assert not os.path.exists(sock.removeprefix("unix://"))


def _task_pid(ctrd: Containerd, cid: str) -> tuple[int, str]:
    for line in ctrd.ctr("tasks", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields[0] == cid:
            return int(fields[1]), fields[2]
    raise AssertionError(f"task {cid} not listed")


@every_host
def test_containerd_restart_reconnects_through_address_file(
    containerd: Containerd, busybox_image: str
) -> None:
    containerd.ctr("run", "-d", "--runtime", RUNTIME, busybox_image, "c1", "sleep", "300")
    pid, status = _task_pid(containerd, "c1")
    assert status == "RUNNING"
    (daemon,) = _daemons(containerd)
    containerd.kill9()
    assert _task_pid(containerd, "c1") == (pid, "RUNNING")
    assert _daemons(containerd) == [daemon]
    containerd.ctr("tasks", "kill", "-s", "SIGKILL", "c1")
    containerd.ctr("tasks", "delete", "c1", check=False)
    deadline = time.monotonic() + 20
    while containerd.ctr("tasks", "ls", "-q").stdout.split():
        if time.monotonic() > deadline:
            pytest.fail("task c1 never went away")
        containerd.ctr("tasks", "delete", "c1", check=False)
        time.sleep(0.2)


@every_host
def test_shim_killed_is_cleaned_up_with_delete(containerd: Containerd, busybox_image: str) -> None:
    containerd.ctr("run", "-d", "--runtime", RUNTIME, busybox_image, "c1", "sleep", "300")
    pid, _ = _task_pid(containerd, "c1")
    (daemon,) = _daemons(containerd)
    os.kill(daemon, signal.SIGKILL)
    _wait_gone(daemon)
    # containerd notices the disconnect, runs `<shim> delete` (runc delete --force).
    _wait_gone(pid, timeout=20)
    deadline = time.monotonic() + 20
    while "cleaning up dead shim" not in containerd.log_text():
        if time.monotonic() > deadline:
            pytest.fail("containerd never cleaned up the dead shim")
        time.sleep(0.1)
    # That log line comes before `delete` runs; runc's state going away marks its end.
    runc_state = Path("/run/containerd/runc") / containerd.namespace / "c1"
    while runc_state.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{runc_state} still there: `delete` did not run runc delete --force")
        time.sleep(0.1)
    ls = containerd.ctr("tasks", "ls").stdout
    assert "RUNNING" not in ls
    assert "failed to delete" not in containerd.log_text()
