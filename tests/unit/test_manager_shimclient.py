"""pyshimd's task API client: the deadlines of a shim that is still starting."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid

import pytest

from manager import shimclient
from manager.shimclient import TASK_SERVICE, ShimClient
from protocol.proto.task.v2 import shim_pb2
from protocol.ttrpc.server import Method, RequestContext, Server
from protocol.ttrpc.status import Code, ConnectionClosedError, TtrpcError

# Every answer comes this late: a daemon still importing, as in a loaded qemu TCG guest.
ANSWER_AFTER = 0.6


async def _slow_connect(
    ctx: RequestContext, req: shim_pb2.ConnectRequest
) -> shim_pb2.ConnectResponse:
    await asyncio.sleep(ANSWER_AFTER)
    return shim_pb2.ConnectResponse(shim_pid=4242)


@pytest.fixture
def short_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    # Connect's usual budget is shorter than the daemon takes; the first answer's is not.
    monkeypatch.setattr(shimclient, "CONNECT_TIMEOUT", 0.2)
    monkeypatch.setattr(shimclient, "FIRST_ANSWER_TIMEOUT", 5.0)


async def test_a_fresh_shim_gets_time_for_its_first_answer_only(short_budgets: None) -> None:
    server = Server()
    server.register(TASK_SERVICE, {"Connect": Method(shim_pb2.ConnectRequest, _slow_connect)})
    address = "pyshim-shimclient-test-" + uuid.uuid4().hex
    await server.serve_path("\0" + address)
    try:
        # A shim reconnected to: the usual deadline, and the error says which call
        # ran out of what.
        known = await ShimClient.dial(address)
        with pytest.raises(TtrpcError) as err:
            await known.connect("c1")
        assert err.value.code == Code.DEADLINE_EXCEEDED
        assert "shim Connect" in err.value.message and "0.2 s" in err.value.message
        known.close()
        # A shim just started: its first answer is waited for...
        fresh = await ShimClient.dial(address, fresh=True)
        assert (await fresh.connect("c1")).shim_pid == 4242
        # ...and once it serves, its calls have their usual budgets again.
        with pytest.raises(TtrpcError) as err:
            await fresh.connect("c1")
        assert err.value.code == Code.DEADLINE_EXCEEDED
        fresh.close()
    finally:
        server.close()


async def test_a_fresh_shim_that_dies_fails_its_first_call_at_once(short_budgets: None) -> None:
    """The wait is for the daemon, not for the clock: a daemon gone before it served
    takes its listener along, and the call fails then, long before its bound."""
    address = "pyshim-shimclient-test-" + uuid.uuid4().hex
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + address)
    listener.listen()
    fresh = await ShimClient.dial(address, fresh=True)
    call = asyncio.ensure_future(fresh.connect("c1"))
    await asyncio.sleep(0.3)  # past Connect's usual budget, still waiting
    assert not call.done()
    began = time.monotonic()
    listener.close()
    with pytest.raises(ConnectionClosedError):
        await call
    assert time.monotonic() - began < 2.0
    fresh.close()
