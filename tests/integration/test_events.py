"""Events from our Publisher reach a real containerd 1.6 (seen by `ctr events`)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Iterator

import pytest

from protocol.proto.events import task_pb2
from shim.events import Publisher
from shim.reaper import Reaper
from tests.support.containerd import Containerd
from tests.support.ctr_events import CtrEvents
from tests.support.hosts import every_host
from tests.support.reaper import installed_reaper

pytestmark = pytest.mark.integration


@pytest.fixture
def ctr_events(containerd: Containerd) -> Iterator[CtrEvents]:
    ev = CtrEvents(containerd)
    try:
        yield ev
    finally:
        ev.close()


@pytest.fixture
async def reaper() -> AsyncIterator[Reaper]:
    async with installed_reaper() as r:
        yield r


async def _subscribed(ev: CtrEvents, pub: Publisher) -> None:
    """`ctr events` gives no readiness signal: publish probes until one shows up."""
    async with asyncio.timeout(20):
        n = 0
        while not ev.matching("/tasks/oom", "probe-"):
            n += 1
            pub.publish("/tasks/oom", task_pb2.TaskOOM(container_id=f"probe-{n}"))
            await asyncio.sleep(0.3)


@every_host
async def test_forward_over_ttrpc(
    containerd: Containerd, ctr_events: CtrEvents, reaper: Reaper
) -> None:
    pub = Publisher(
        namespace=containerd.namespace,
        ttrpc_address=containerd.ttrpc_address,
        publish_binary=None,
        containerd_address=None,
        reaper=reaper,
    )
    try:
        await _subscribed(ctr_events, pub)
        pub.publish("/tasks/oom", task_pb2.TaskOOM(container_id="c-ttrpc"))
        line = await ctr_events.wait_for("/tasks/oom", '"container_id":"c-ttrpc"')
        assert containerd.namespace in line
        # Strict order through the real daemon.
        for i in range(20):
            pub.publish(
                "/tasks/exit",
                task_pb2.TaskExit(container_id=f"o{i}", id=f"o{i}", pid=100 + i, exit_status=i),
            )
        await ctr_events.wait_for("/tasks/exit", '"container_id":"o19"')
        await pub.close()
        assert pub.dropped == 0
    finally:
        await pub.close()
    exits = ctr_events.matching("/tasks/exit")
    order = [int(ln.split('"container_id":"o', 1)[1].split('"', 1)[0]) for ln in exits]
    assert order == list(range(20))
    # containerd decoded the Any: the typed fields are shown.
    assert '"exit_status":7' in exits[7]


async def test_forward_survives_containerd_restart(containerd: Containerd, reaper: Reaper) -> None:
    pub = Publisher(
        namespace=containerd.namespace,
        ttrpc_address="unix://" + containerd.ttrpc_address,
        publish_binary=None,
        containerd_address=None,
        reaper=reaper,
    )
    ev = CtrEvents(containerd)
    try:
        await _subscribed(ev, pub)
        ev.close()
        await asyncio.to_thread(containerd.restart)
        ev = CtrEvents(containerd)
        await _subscribed(ev, pub)
        pub.publish("/tasks/oom", task_pb2.TaskOOM(container_id="after-restart"))
        await ev.wait_for('"container_id":"after-restart"')
    finally:
        ev.close()
        await pub.close()


@every_host
async def test_publish_binary(
    containerd: Containerd, ctr_events: CtrEvents, reaper: Reaper
) -> None:
    binary = shutil.which(containerd.host.containerd)
    assert binary is not None
    pub = Publisher(
        namespace=containerd.namespace,
        ttrpc_address=None,
        publish_binary=binary,
        containerd_address=containerd.address,
        reaper=reaper,
    )
    try:
        await _subscribed(ctr_events, pub)
        pub.publish("/tasks/oom", task_pb2.TaskOOM(container_id="c-binary"))
        line = await ctr_events.wait_for("/tasks/oom", '"container_id":"c-binary"')
        assert containerd.namespace in line
    finally:
        with contextlib.suppress(Exception):
            await pub.close()
    assert pub.dropped == 0


@every_host
def test_task_lifecycle_events_from_the_shim(
    containerd: Containerd, ctr_events: CtrEvents, busybox_image: str
) -> None:
    containerd.ctr(
        "run", "-d", "--runtime", "io.containerd.pyshim.v1", busybox_image, "c1", "sleep", "300"
    )
    containerd.ctr("tasks", "kill", "-s", "SIGKILL", "c1")
    containerd.ctr("tasks", "delete", "c1", check=False)  # races the exit; retried below

    async def settle() -> None:
        async with asyncio.timeout(20):
            while not ctr_events.matching("/tasks/delete", '"container_id":"c1"'):
                await asyncio.to_thread(
                    containerd.ctr, "tasks", "delete", "c1", check=False, timeout=20
                )
                await asyncio.sleep(0.2)

    asyncio.run(settle())
    # "<date> <time> +0000 UTC <namespace> <topic> <json>"
    topics = [
        ln.split()[5] for ln in ctr_events.lines if "/tasks/" in ln and '"container_id":"c1"' in ln
    ]
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], (
        ctr_events.lines
    )
    exit_line = ctr_events.matching("/tasks/exit", '"container_id":"c1"')[0]
    assert '"id":"c1"' in exit_line and '"exit_status":137' in exit_line
