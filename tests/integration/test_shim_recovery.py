"""Exits survive the shim: persisted before they are told, answered after a shim restart.

The test drives a shim daemon directly (``-socket``, cwd = bundle, as `start` would
leave it) with our own ttrpc client, plays containerd's event sink on
``$TTRPC_ADDRESS``, and SIGKILLs the daemon to start a new one on the same bundle.
runc's root, the namespace and the cgroup are private to each test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from crashtest.images import build_busybox_rootfs, write_oci_bundle
from protocol.proto import anyutil
from protocol.proto.events import forward_pb2
from protocol.proto.events import task_pb2 as events_pb2
from protocol.proto.runc import options_pb2
from protocol.proto.task.v2 import shim_pb2
from protocol.proto.timeutil import ns_from_timestamp
from protocol.proto.types import mount_pb2
from protocol.proto.types import task_pb2 as types_pb2
from protocol.ttrpc.client import Client
from protocol.ttrpc.server import Method, RequestContext, Server
from protocol.ttrpc.status import Code, TtrpcError
from shim.events import OUTBOX_LOG
from shim.records.recordlog import RECORD, encode, log_path, parse, read_live
from shim.records.statedir import EXIT_LOG
from shim.sys.procfs import gone

pytestmark = pytest.mark.integration

TASK = "containerd.task.v2.Task"
EVENTS = "containerd.services.events.ttrpc.v1.Events"
TIMEOUT = 20.0
UNKNOWN_EXIT = 255

M = TypeVar("M", bound=Message)

_TOPIC_TYPES: dict[str, type[Message]] = {
    "/tasks/create": events_pb2.TaskCreate,
    "/tasks/start": events_pb2.TaskStart,
    "/tasks/exit": events_pb2.TaskExit,
    "/tasks/delete": events_pb2.TaskDelete,
}


def _shim_binary() -> str:
    venv_bin = os.path.dirname(sys.executable)
    found = shutil.which(
        "containerd-shim-pyshim-v1", path=venv_bin + os.pathsep + os.environ["PATH"]
    )
    if found is None:
        pytest.fail("containerd-shim-pyshim-v1 is not installed in the venv", pytrace=False)
    return found


def _mounts_under(prefix: Path) -> list[str]:
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == str(prefix) or mp.startswith(f"{prefix}/"):
                found.append(mp)
    return found


def exit_record(bundle: Path, process_id: str) -> dict[str, Any] | None:
    """The JSON of ``process_id``'s latest exit record in the bundle's exit log."""
    found = None
    for _, payload in read_live(log_path(str(bundle), EXIT_LOG)):
        record = json.loads(payload)
        if (record["exec_id"] or record["container_id"]) == process_id:
            found = record
    return found


class EventSink:
    """containerd's Forward endpoint; notes what was on disk when each exit arrived."""

    def __init__(self, bundle: Path) -> None:
        self.bundle = bundle
        self.received: list[tuple[str, Message]] = []
        # exit event id -> the exit record's JSON at the moment the event arrived
        self.record_at_exit: dict[str, dict[str, Any] | None] = {}
        self.arrived = asyncio.Event()
        self.server = Server()
        self.server.register(EVENTS, {"Forward": Method(forward_pb2.ForwardRequest, self.forward)})

    async def forward(self, ctx: RequestContext, req: forward_pb2.ForwardRequest) -> Message:
        env = req.envelope
        event_type = _TOPIC_TYPES.get(env.topic)
        event = anyutil.unpack(env.event, event_type) if event_type else env.event
        if isinstance(event, events_pb2.TaskExit):
            self.record_at_exit[event.id] = exit_record(self.bundle, event.id)
        self.received.append((env.topic, event))
        self.arrived.set()
        return empty_pb2.Empty()

    def topics(self) -> list[str]:
        return [topic for topic, _ in self.received]

    async def wait_for(self, topic: str, count: int = 1) -> list[Message]:
        async def wait() -> list[Message]:
            while True:
                found = [e for t, e in self.received if t == topic]
                if len(found) >= count:
                    return found
                self.arrived.clear()
                await self.arrived.wait()

        try:
            return await asyncio.wait_for(wait(), TIMEOUT)
        except TimeoutError:
            raise AssertionError(f"no {topic} event; got {self.topics()}") from None


class ShimRig:
    """One bundle, one runc root, shim daemons started and killed by pid."""

    def __init__(self, cid: str, args: list[str]) -> None:
        self.cid = cid
        self.tmp = Path(tempfile.mkdtemp(prefix="pyshim-rec-", dir="/tmp"))
        self.namespace = f"pyrec-{secrets.token_hex(4)}"
        self.runc_root = self.tmp / "runc"
        self.bundle = self.tmp / "bundles" / cid
        self.lower = self.tmp / "lower"
        self.socket = self.tmp / "shim.sock"
        self.cgroup_parent = f"pyshim-rec-{secrets.token_hex(4)}"
        self.daemons: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.container_pids: set[int] = set()
        self.client: Client | None = None
        build_busybox_rootfs(self.lower)
        (self.bundle / "rootfs").mkdir(parents=True, mode=0o711)
        write_oci_bundle(
            self.bundle,
            args,
            rootfs=self.bundle / "rootfs",
            cgroups_path=f"/{self.cgroup_parent}/{cid}",
        )
        self.events = EventSink(self.bundle)

    @property
    def runc_state_dir(self) -> Path:
        return self.runc_root / self.namespace / self.cid

    def exit_record(self, process_id: str | None = None) -> dict[str, Any] | None:
        return exit_record(self.bundle, process_id or self.cid)

    # -- daemons -------------------------------------------------------------------

    async def start_daemon(self) -> subprocess.Popen[bytes]:
        """A daemon serving ``self.socket`` with cwd = bundle, and our client connected to it."""
        n = len(self.daemons)
        log_path = self.tmp / f"shim-{n}.log"
        self.logs.append(log_path)
        env = dict(os.environ)
        env["TTRPC_ADDRESS"] = str(self.tmp / "events.sock")
        argv = [
            _shim_binary(),
            "-namespace", self.namespace,
            # No containerd: events go to our sink, never through a publish binary.
            "-address", str(self.tmp / "no-containerd.sock"),
            "-publish-binary", "/bin/false",
            "-id", self.cid,
            "-debug",
            "-socket", str(self.socket),
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv,
                cwd=self.bundle,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
                process_group=0,
            )
        self.daemons.append(proc)
        if self.client is not None:
            self.client.close()
            self.client = None
        deadline = time.monotonic() + TIMEOUT
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"shim daemon exited {proc.returncode}: {self.log(n)}")
            try:
                client = await Client.connect(str(self.socket), timeout=2)
            except OSError:
                client = None
            if client is not None:
                try:
                    resp = await client.call(
                        TASK, "Connect", shim_pb2.ConnectRequest(id=self.cid),
                        shim_pb2.ConnectResponse, timeout=5,
                    )  # fmt: skip
                except (OSError, TtrpcError):
                    resp = None
                # A stale socket of a killed daemon is unlinked by the new one.
                if resp is not None and resp.shim_pid == proc.pid:
                    self.client = client
                    return proc
                client.close()
            if time.monotonic() > deadline:
                raise AssertionError(f"shim daemon never answered: {self.log(n)}")
            await asyncio.sleep(0.05)

    def kill_daemon(self, proc: subprocess.Popen[bytes]) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)

    def log(self, n: int = -1) -> str:
        try:
            return self.logs[n].read_text(errors="replace")
        except (IndexError, FileNotFoundError):
            return ""

    async def call(
        self, method: str, req: Message, resp_type: type[M], timeout: float = TIMEOUT
    ) -> M:
        assert self.client is not None, "no daemon connected"
        return await self.client.call(TASK, method, req, resp_type, timeout=timeout)

    # -- requests --------------------------------------------------------------------

    async def create(self, binary: str = "") -> int:
        """Create (not start) the container; ``binary`` replaces runc."""
        options = options_pb2.Options(root=str(self.runc_root), binary_name=binary)
        req = shim_pb2.CreateTaskRequest(
            id=self.cid,
            bundle=str(self.bundle),
            rootfs=[mount_pb2.Mount(type="bind", source=str(self.lower), options=["rbind", "rw"])],
            options=anyutil.pack(options),
        )
        created = await self.call("Create", req, shim_pb2.CreateTaskResponse)
        self.container_pids.add(created.pid)
        return created.pid

    async def create_and_start(self, binary: str = "") -> int:
        pid = await self.create(binary)
        started = await self.call(
            "Start", shim_pb2.StartRequest(id=self.cid), shim_pb2.StartResponse
        )
        assert started.pid == pid
        return pid

    def logging_runc(self) -> tuple[str, Path]:
        """A runc that appends each argv to a file (returned) and runs the real one."""
        runc = shutil.which("runc")
        if runc is None:
            pytest.fail("runc is not installed", pytrace=False)
        log = self.tmp / "runc-calls.log"
        wrapper = self.tmp / "logging-runc"
        wrapper.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {runc} "$@"\n')
        wrapper.chmod(0o755)
        return str(wrapper), log

    def runc_kills(self, log: Path) -> list[str]:
        """The `kill` commands the logging runc ran, without the global flags."""
        if not log.exists():
            return []
        lines = log.read_text().splitlines()
        return [line[line.index(" kill ") + 1 :] for line in lines if " kill " in line]

    async def state(self) -> shim_pb2.StateResponse:
        return await self.call("State", shim_pb2.StateRequest(id=self.cid), shim_pb2.StateResponse)

    async def wait(self, timeout: float = TIMEOUT) -> shim_pb2.WaitResponse:
        return await self.call(
            "Wait", shim_pb2.WaitRequest(id=self.cid), shim_pb2.WaitResponse, timeout=timeout
        )

    async def shutdown_daemon(self, proc: subprocess.Popen[bytes]) -> None:
        # The daemon may close the connection before answering; both are success.
        with contextlib.suppress(TtrpcError, OSError):
            await self.call("Shutdown", shim_pb2.ShutdownRequest(id=self.cid), empty_pb2.Empty)
        await asyncio.to_thread(proc.wait, TIMEOUT)

    # -- cleanup -----------------------------------------------------------------------

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        for proc in self.daemons:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=TIMEOUT)
        root = self.runc_root / self.namespace
        if root.is_dir():
            for entry in root.iterdir():
                subprocess.run(["runc", "--root", str(root), "delete", "--force", entry.name],
                               capture_output=True, timeout=TIMEOUT, check=False)  # fmt: skip
        for pid in self.container_pids:
            # Only if runc's delete missed it; the pid is one our shim reported.
            if not gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for _ in range(10):
            mounts = _mounts_under(self.tmp)
            if not mounts:
                break
            for mp in sorted(mounts, key=len, reverse=True):
                subprocess.run(
                    ["umount", "-l", mp], capture_output=True, timeout=TIMEOUT, check=False
                )
        for parent in Path("/sys/fs/cgroup").glob(f"*/{self.cgroup_parent}"):
            for sub in sorted(parent.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if sub.is_dir():
                    with contextlib.suppress(OSError):
                        sub.rmdir()
            with contextlib.suppress(OSError):
                parent.rmdir()
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.asynccontextmanager
async def shim_rig(cid: str, args: list[str]) -> AsyncIterator[ShimRig]:
    if shutil.which("runc") is None:
        pytest.fail("runc is not installed", pytrace=False)
    rig = await asyncio.to_thread(ShimRig, cid, args)
    try:
        await rig.events.server.serve_path(str(rig.tmp / "events.sock"))
        yield rig
    except BaseException:
        # The shim's own account is the first thing to read when this fails.
        for i in range(len(rig.logs)):
            print(f"---- shim daemon {i} log ----\n{rig.log(i)}", file=sys.stderr)
        raise
    finally:
        rig.events.server.close()
        await asyncio.to_thread(rig.close)


async def _until(what: str, check: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return result


# ---------------------------------------------------------------------------------------


async def test_exit_is_persisted_first_and_survives_a_shim_restart() -> None:
    """Every exit is on disk before it is published or returned from Wait, and a shim
    restarted on the bundle answers State/Wait/Delete from it."""
    async with shim_rig("rec1", ["sh", "-c", "exit 7"]) as rig:
        first = await rig.start_daemon()
        pid = await rig.create_and_start()
        waited = await rig.wait()
        assert waited.exit_status == 7
        exited_at_ns = ns_from_timestamp(waited.exited_at)
        assert abs(exited_at_ns - time.time_ns()) < 60 * 10**9

        record = rig.exit_record()
        assert record == {
            "version": 1,
            "container_id": "rec1",
            "exec_id": "",
            "pid": pid,
            "exit_status": 7,
            "exited_at_ns": exited_at_ns,
        }
        (exit_event,) = await rig.events.wait_for("/tasks/exit")
        assert isinstance(exit_event, events_pb2.TaskExit)
        assert (exit_event.id, exit_event.pid, exit_event.exit_status) == ("rec1", pid, 7)
        # The sink read the file the moment the event arrived: it was already there.
        assert rig.events.record_at_exit["rec1"] == record
        assert rig.events.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit"]
        # Events are delivered at least once: one acknowledged but still in the outbox
        # when the shim dies is replayed by its successor (pyshimd dedupes). Kill only
        # once the first shim has retired every delivered event, so a second exit
        # below would be a real double report.
        deadline = time.monotonic() + TIMEOUT
        while left := read_live(log_path(str(rig.bundle), OUTBOX_LOG)):
            assert time.monotonic() < deadline, f"outbox never drained: {len(left)} left"
            await asyncio.sleep(0.02)

        rig.kill_daemon(first)
        second = await rig.start_daemon()
        assert second.pid != first.pid

        state = await rig.state()
        assert state.status == types_pb2.STOPPED
        assert (state.pid, state.exit_status) == (pid, 7)
        assert ns_from_timestamp(state.exited_at) == exited_at_ns
        assert state.bundle == str(rig.bundle)

        t0 = time.monotonic()
        again = await rig.wait(timeout=2)
        assert time.monotonic() - t0 < 1.0
        assert again.exit_status == 7
        assert ns_from_timestamp(again.exited_at) == exited_at_ns

        assert rig.runc_state_dir.is_dir()
        assert _mounts_under(rig.bundle / "rootfs"), "the first shim mounted the rootfs"
        deleted = await rig.call(
            "Delete", shim_pb2.DeleteRequest(id="rec1"), shim_pb2.DeleteResponse
        )
        assert (deleted.pid, deleted.exit_status) == (pid, 7)
        assert ns_from_timestamp(deleted.exited_at) == exited_at_ns
        assert not rig.runc_state_dir.exists()
        assert _mounts_under(rig.bundle / "rootfs") == []
        with pytest.raises(TtrpcError) as gone:
            await rig.state()
        assert gone.value.code == Code.NOT_FOUND

        (delete_event,) = await rig.events.wait_for("/tasks/delete")
        assert isinstance(delete_event, events_pb2.TaskDelete)
        assert (delete_event.pid, delete_event.exit_status) == (pid, 7)
        # The restarted shim told nobody about the old exit a second time.
        assert rig.events.topics().count("/tasks/exit") == 1

        await rig.shutdown_daemon(second)
        assert second.returncode == 0
        assert not rig.socket.exists()


async def test_running_container_outlives_its_shim_and_is_reported_honestly() -> None:
    """A container still running when its shim is SIGKILLed keeps running. The
    restarted shim finds it through ``runc state`` and reports RUNNING with the same
    pid, but it is no longer the container's parent (the orphan went to the nearest
    subreaper, normally pid 1), so it can never learn the real exit status. When the
    container dies the shim notices (pidfd) and reports STOPPED with status 255,
    "unknown", recorded on disk before it is published or returned by Wait — never
    RUNNING forever and never a made-up real-looking status."""
    async with shim_rig("rec2", ["sleep", "300"]) as rig:
        first = await rig.start_daemon()
        runc, runc_log = rig.logging_runc()
        pid = await rig.create_and_start(runc)
        assert (await rig.state()).status == types_pb2.RUNNING

        rig.kill_daemon(first)
        await asyncio.sleep(0.2)
        assert not gone(pid), "the container died with its shim"

        await rig.start_daemon()
        state = await rig.state()
        assert (state.status, state.pid) == (types_pb2.RUNNING, pid)
        assert rig.exit_record() is None
        waiter = asyncio.ensure_future(rig.wait())
        await asyncio.sleep(0.3)
        assert not waiter.done(), "Wait returned while the container still runs"

        await rig.call(
            "Kill", shim_pb2.KillRequest(id="rec2", signal=signal.SIGKILL), empty_pb2.Empty
        )
        # Not our child any more, so its pid may be reused: runc checks, not os.kill.
        assert rig.runc_kills(runc_log) == ["kill rec2 9"]
        waited = await waiter
        assert waited.exit_status == UNKNOWN_EXIT
        record = rig.exit_record()
        assert record is not None
        assert (record["pid"], record["exit_status"]) == (pid, UNKNOWN_EXIT)
        assert record["exited_at_ns"] == ns_from_timestamp(waited.exited_at)
        (exit_event,) = await rig.events.wait_for("/tasks/exit")
        assert isinstance(exit_event, events_pb2.TaskExit)
        assert (exit_event.pid, exit_event.exit_status) == (pid, UNKNOWN_EXIT)
        assert rig.events.record_at_exit["rec2"] == record

        state = await rig.state()
        assert (state.status, state.exit_status) == (types_pb2.STOPPED, UNKNOWN_EXIT)
        deleted = await rig.call(
            "Delete", shim_pb2.DeleteRequest(id="rec2"), shim_pb2.DeleteResponse
        )
        assert (deleted.pid, deleted.exit_status) == (pid, UNKNOWN_EXIT)
        assert not rig.runc_state_dir.exists()
        assert _mounts_under(rig.bundle / "rootfs") == []


@pytest.mark.parametrize("which", ["exit", "container"])
async def test_record_of_unknown_version_is_refused_not_misread(which: str) -> None:
    """Records carry a version; a shim meeting one it does not know refuses it with a
    clear error (in its log) and leaves the file alone, rather than guessing."""
    async with shim_rig(f"rec3{which}", ["sh", "-c", "exit 3"]) as rig:
        first = await rig.start_daemon()
        await rig.create_and_start()
        assert (await rig.wait()).exit_status == 3
        rig.kill_daemon(first)

        if which == "exit":
            # The init's record, rewritten in place in its log as a later version would.
            path = Path(log_path(str(rig.bundle), EXIT_LOG))
            ((seq, payload),) = parse(path.read_bytes()).live
            future = json.loads(payload)
            assert future["version"] == 1
            future["version"] = 99
            future_bytes = encode(RECORD, seq, json.dumps(future).encode())
            named = f"{path} #{seq}"
        else:
            path = rig.bundle / "pyshim" / "container.json"
            future = json.loads(path.read_bytes())
            assert future["version"] == 1
            future["version"] = 99
            future_bytes = json.dumps(future).encode()
            named = str(path)
        path.write_bytes(future_bytes)

        await rig.start_daemon()
        with pytest.raises(TtrpcError) as refused:
            await rig.state()
        assert refused.value.code == Code.NOT_FOUND
        log = await _until(
            "the refusal in the shim log", lambda: "version 99" in rig.log() and rig.log()
        )
        assert f"record {named} has version 99; this shim reads version 1" in log
        assert path.read_bytes() == future_bytes

        # `delete` (what containerd runs for a shim it cannot use) does not misread it either.
        res = await asyncio.to_thread(
            subprocess.run,
            [_shim_binary(), "-namespace", rig.namespace, "-address", "/nonexistent",
             "-id", rig.cid, "delete"],
            cwd=rig.bundle, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        resp = shim_pb2.DeleteResponse.FromString(res.stdout)
        if which == "exit":
            assert resp.exit_status == 137, "an unreadable record must not be taken as the exit"
            assert b"version 99" in res.stderr
        else:
            assert resp.exit_status == 3
        assert path.read_bytes() == future_bytes
