"""pyshimd's task API client: the deadlines of a shim that is still starting."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from manager import shimclient
from manager.shimclient import TASK_SERVICE, ShimClient, call_budget
from protocol.proto.task.v2 import shim_pb2
from protocol.ttrpc.server import Method, RequestContext, Server
from protocol.ttrpc.status import Code, TtrpcError

# A daemon that answers its first call this late: still importing, as under qemu TCG.
ANSWER_AFTER = 0.6


async def _slow_connect(
    ctx: RequestContext, req: shim_pb2.ConnectRequest
) -> shim_pb2.ConnectResponse:
    await asyncio.sleep(ANSWER_AFTER)
    return shim_pb2.ConnectResponse(shim_pid=4242)


async def test_a_slowly_started_shim_gets_a_longer_first_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Connect's usual budget is shorter than the daemon takes to answer.
    monkeypatch.setattr(shimclient, "CONNECT_TIMEOUT", 0.2)
    server = Server()
    server.register(TASK_SERVICE, {"Connect": Method(shim_pb2.ConnectRequest, _slow_connect)})
    address = "pyshim-shimclient-test-" + uuid.uuid4().hex
    await server.serve_path("\0" + address)
    try:
        # A shim whose `start` was quick (or one reconnected to): the usual deadline,
        # and the error says which call ran out of what.
        quick = await ShimClient.dial(address)
        with pytest.raises(TtrpcError) as err:
            await quick.connect("c1")
        assert err.value.code == Code.DEADLINE_EXCEEDED
        assert "shim Connect" in err.value.message and "0.2 s" in err.value.message
        quick.close()
        # Its `start` took 0.1 s: this machine is slow at starting interpreters, so the
        # first answer may take up to ten times that.
        slow = await ShimClient.dial(address, start_seconds=0.1)
        assert (await slow.connect("c1")).shim_pid == 4242
        slow.close()
    finally:
        server.close()


def test_call_budget_never_shortens_the_usual_one() -> None:
    assert call_budget(30.0, 0.05) == 30.0
    assert call_budget(5.0, 2.0) == 2.0 * shimclient.SLOW_START_FACTOR
