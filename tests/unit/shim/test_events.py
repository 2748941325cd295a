"""Publisher against a Python ttrpc server standing in for containerd's Events service."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from protocol.proto import anyutil
from protocol.proto.events import forward_pb2, task_pb2
from protocol.ttrpc.server import Method, RequestContext, Server
from protocol.ttrpc.status import Code, TtrpcError
from shim.events import EVENTS_SERVICE, NAMESPACE_METADATA_KEY, Publisher
from shim.reaper import Reaper


class FakeContainerd:
    """containerd's Events/Forward: records envelopes, fails on demand."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.received: list[forward_pb2.Envelope] = []
        self.metadata: list[dict[str, list[str]]] = []
        self.fail_next: list[Code] = []
        self.calls = 0
        self.hang = False
        self.server: Server | None = None
        self.got = asyncio.Event()

    async def forward(
        self, ctx: RequestContext, req: forward_pb2.ForwardRequest
    ) -> empty_pb2.Empty:
        self.calls += 1
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail_next:
            raise TtrpcError(self.fail_next.pop(0), "injected failure")
        self.received.append(req.envelope)
        self.metadata.append({k: list(v) for k, v in ctx.metadata.items()})
        self.got.set()
        return empty_pb2.Empty()

    async def start(self) -> None:
        self.server = Server()
        self.server.register(
            EVENTS_SERVICE, {"Forward": Method(forward_pb2.ForwardRequest, self.forward)}
        )
        await self.server.serve_path(self.path)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        if os.path.exists(self.path):
            os.unlink(self.path)

    async def wait_for(self, n: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.received) < n:
                self.got.clear()
                await self.got.wait()

    def topics(self) -> list[str]:
        return [e.topic for e in self.received]


@pytest.fixture
async def ctrd(tmp_path: Path) -> AsyncIterator[FakeContainerd]:
    fake = FakeContainerd(str(tmp_path / "ttrpc.sock"))
    await fake.start()
    yield fake
    await fake.stop()


def _publisher(address: str | None, **kwargs: float) -> Publisher:
    return Publisher(
        namespace="ns1",
        ttrpc_address=address,
        publish_binary=None,
        containerd_address=None,
        reaper=Reaper(),
        backoff_step=kwargs.get("backoff_step", 0.01),
        backoff_max=kwargs.get("backoff_max", 0.05),
        max_attempts=int(kwargs.get("max_attempts", 6)),
    )


def _exit(cid: str, status: int) -> task_pb2.TaskExit:
    return task_pb2.TaskExit(container_id=cid, id=cid, pid=42, exit_status=status)


async def test_envelope_contents(ctrd: FakeContainerd) -> None:
    pub = _publisher("unix://" + ctrd.path)
    before = time.time()
    pub.publish("/tasks/oom", task_pb2.TaskOOM(container_id="c1"))
    await ctrd.wait_for(1)
    await pub.close()
    env = ctrd.received[0]
    assert env.namespace == "ns1"
    assert env.topic == "/tasks/oom"
    assert env.event.type_url == "containerd.events.TaskOOM"
    assert anyutil.unpack(env.event, task_pb2.TaskOOM).container_id == "c1"
    assert env.HasField("timestamp")
    assert before - 1 <= env.timestamp.seconds <= time.time() + 1
    assert ctrd.metadata[0][NAMESPACE_METADATA_KEY] == ["ns1"]


async def test_timestamp_is_event_time_not_send_time(ctrd: FakeContainerd) -> None:
    await ctrd.stop()  # containerd down: the event waits in the queue
    pub = _publisher(ctrd.path, backoff_step=0.3, backoff_max=0.3)
    created = time.time_ns()
    pub.publish("/tasks/paused", task_pb2.TaskPaused(container_id="c1"))
    await asyncio.sleep(0.5)
    await ctrd.start()
    await ctrd.wait_for(1)
    await pub.close()
    ts = ctrd.received[0].timestamp
    stamped = ts.seconds * 10**9 + ts.nanos
    assert abs(stamped - created) < 200_000_000


async def test_strict_order_many_events(ctrd: FakeContainerd) -> None:
    pub = _publisher(ctrd.path)
    for i in range(200):
        pub.publish("/tasks/exit", _exit(f"c{i}", i % 256))
    await ctrd.wait_for(200)
    await pub.close()
    ids = [anyutil.unpack(e.event, task_pb2.TaskExit).container_id for e in ctrd.received]
    assert ids == [f"c{i}" for i in range(200)]
    assert pub.sent == 200 and pub.dropped == 0


async def test_failing_head_blocks_later_events(ctrd: FakeContainerd) -> None:
    ctrd.fail_next = [Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.UNAVAILABLE]
    pub = _publisher(ctrd.path)
    pub.publish("/tasks/create", task_pb2.TaskCreate(container_id="c1"))
    pub.publish("/tasks/start", task_pb2.TaskStart(container_id="c1", pid=1))
    pub.publish("/tasks/exit", _exit("c1", 0))
    await ctrd.wait_for(3)
    await pub.close()
    assert ctrd.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit"]
    assert ctrd.calls == 6


async def test_dropped_after_max_attempts_then_next_goes(ctrd: FakeContainerd) -> None:
    ctrd.fail_next = [Code.UNAVAILABLE] * 3
    pub = _publisher(ctrd.path, max_attempts=3)
    pub.publish("/tasks/create", task_pb2.TaskCreate(container_id="lost"))
    pub.publish("/tasks/create", task_pb2.TaskCreate(container_id="kept"))
    await ctrd.wait_for(1)
    await pub.close()
    assert pub.dropped == 1
    got = anyutil.unpack(ctrd.received[0].event, task_pb2.TaskCreate)
    assert got.container_id == "kept"


async def test_invalid_argument_is_not_retried(ctrd: FakeContainerd) -> None:
    ctrd.fail_next = [Code.INVALID_ARGUMENT]
    pub = _publisher(ctrd.path, backoff_step=10, backoff_max=10)
    pub.publish("/tasks/x", task_pb2.TaskOOM(container_id="bad"))
    pub.publish("/tasks/oom", task_pb2.TaskOOM(container_id="good"))
    await ctrd.wait_for(1, timeout=2)
    await pub.close()
    assert ctrd.calls == 2 and pub.dropped == 1


async def test_lazy_connect_and_reconnect_after_containerd_restart(
    ctrd: FakeContainerd,
) -> None:
    await ctrd.stop()
    pub = _publisher(ctrd.path)
    # Constructing and idling never dials.
    await asyncio.sleep(0.05)
    await ctrd.start()
    pub.publish("/tasks/oom", task_pb2.TaskOOM(container_id="a"))
    await ctrd.wait_for(1)
    await ctrd.stop()  # drops the publisher's connection
    await ctrd.start()
    pub.publish("/tasks/oom", task_pb2.TaskOOM(container_id="b"))
    await ctrd.wait_for(2)
    await pub.close()
    assert pub.dropped == 0
    # The closed connection was redialled at once: no backoff attempt was used.
    assert ctrd.calls == 2


async def test_events_published_while_containerd_down_arrive_in_order(
    ctrd: FakeContainerd,
) -> None:
    await ctrd.stop()
    pub = _publisher(ctrd.path, backoff_step=0.05, backoff_max=0.05, max_attempts=100)
    for i in range(5):
        pub.publish("/tasks/oom", task_pb2.TaskOOM(container_id=f"c{i}"))
    await asyncio.sleep(0.2)
    assert pub.pending == 5
    await ctrd.start()
    await ctrd.wait_for(5)
    await pub.close()
    ids = [anyutil.unpack(e.event, task_pb2.TaskOOM).container_id for e in ctrd.received]
    assert ids == [f"c{i}" for i in range(5)]


async def test_publish_never_blocks(ctrd: FakeContainerd) -> None:
    ctrd.hang = True
    pub = _publisher(ctrd.path)
    t0 = time.monotonic()
    for i in range(100):
        pub.publish("/tasks/oom", task_pb2.TaskOOM(container_id=f"c{i}"))
    assert time.monotonic() - t0 < 0.5
    t0 = time.monotonic()
    await pub.close(timeout=0.3)
    assert time.monotonic() - t0 < 2
    assert pub.dropped == 100
    pub.publish("/tasks/oom", task_pb2.TaskOOM(container_id="late"))
    assert pub.dropped == 101


async def test_bounded_queue(tmp_path: Path) -> None:
    pub = Publisher(
        namespace="ns1",
        ttrpc_address=str(tmp_path / "nobody"),
        publish_binary=None,
        containerd_address=None,
        reaper=Reaper(),
        max_queue=3,
        backoff_step=10,
    )
    for i in range(5):
        pub.publish("/tasks/oom", task_pb2.TaskOOM(container_id=f"c{i}"))
    assert pub.pending == 3
    assert pub.dropped == 2
    await pub.close(timeout=0.1)


async def test_idle_publisher_has_no_task(ctrd: FakeContainerd) -> None:
    pub = _publisher(ctrd.path)
    pub.publish("/tasks/oom", task_pb2.TaskOOM(container_id="c1"))
    await ctrd.wait_for(1)
    for _ in range(10):
        await asyncio.sleep(0)
    # Nothing left to send: no sender task, no retry timer.
    assert asyncio.all_tasks() == {asyncio.current_task()}
    loop = asyncio.get_running_loop()
    assert not [h for h in getattr(loop, "_scheduled", []) if not h.cancelled()]
    await pub.close()


async def test_close_flushes_queue(ctrd: FakeContainerd) -> None:
    pub = _publisher(ctrd.path)
    for i in range(20):
        pub.publish("/tasks/oom", task_pb2.TaskOOM(container_id=f"c{i}"))
    await pub.close()
    assert len(ctrd.received) == 20


async def test_publish_binary_fallback(tmp_path: Path) -> None:
    script = tmp_path / "containerd"
    out = tmp_path / "out"
    script.write_text(f'#!/bin/sh\necho "$@" > {out}.argv\ncat > {out}.stdin\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    reaper = Reaper()
    reaper.install(asyncio.get_running_loop())
    try:
        pub = Publisher(
            namespace="ns1",
            ttrpc_address=None,
            publish_binary=str(script),
            containerd_address="/run/ctrd.sock",
            reaper=reaper,
        )
        pub.publish("/tasks/oom", task_pb2.TaskOOM(container_id="cX"))
        await pub.close()
    finally:
        reaper.uninstall()
    assert pub.sent == 1
    argv = (tmp_path / "out.argv").read_text().split()
    assert argv == [
        "--address", "/run/ctrd.sock", "publish", "--topic", "/tasks/oom", "--namespace", "ns1",
    ]  # fmt: skip
    # Exactly the bytes the spec fed to `containerd publish`.
    assert (tmp_path / "out.stdin").read_bytes() == (
        b"\x0a\x19containerd.events.TaskOOM\x12\x04\x0a\x02cX"
    )


async def test_publish_binary_failure_is_retried(tmp_path: Path) -> None:
    script = tmp_path / "containerd"
    count = tmp_path / "count"
    # Fails twice, then succeeds.
    script.write_text(
        f"#!/bin/sh\necho x >> {count}\n[ $(wc -l < {count}) -ge 3 ] || exit 1\ncat >/dev/null\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    reaper = Reaper()
    reaper.install(asyncio.get_running_loop())
    try:
        pub = Publisher(
            namespace="ns1",
            ttrpc_address=None,
            publish_binary=str(script),
            containerd_address="/run/ctrd.sock",
            reaper=reaper,
            backoff_step=0.01,
        )
        pub.publish("/tasks/oom", task_pb2.TaskOOM(container_id="cX"))
        await pub.close()
    finally:
        reaper.uninstall()
    assert (pub.sent, pub.dropped) == (1, 0)
    assert count.read_text().count("x") == 3
