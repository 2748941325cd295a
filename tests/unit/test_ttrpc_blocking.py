"""The blocking client against the asyncio server over real unix sockets: the same
answers, errors, deadlines and lost connections as the asyncio client, plus its idle
callback."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from google.protobuf.empty_pb2 import Empty

from protocol.proto.ttrpc_pb2 import KeyValue, StringList
from protocol.ttrpc import Code, ConnectionClosedError
from protocol.ttrpc.blocking import BlockingClient
from protocol.ttrpc.status import TtrpcError
from tests.unit.test_ttrpc_socket import SVC, abstract_name, serving


async def test_answers_metadata_and_errors() -> None:
    async with serving() as (_, _, path):
        client = await asyncio.to_thread(BlockingClient.connect, path, timeout=5)
        try:
            got = await asyncio.to_thread(
                client.call, SVC, "Echo", KeyValue(key="k", value="v"), KeyValue
            )
            assert (got.key, got.value) == ("k", "v")
            meta = await asyncio.to_thread(
                client.call, SVC, "Metadata", Empty(), StringList, metadata={"Who": "cli"}
            )
            assert list(meta.list) == ["who=cli"]
            with pytest.raises(TtrpcError) as err:
                await asyncio.to_thread(client.call, SVC, "Fail", KeyValue(key="ttrpc"), Empty)
            assert err.value.code == Code.NOT_FOUND
            assert err.value.message == "container not created: not found"
            # The connection is still good after a failed call.
            got = await asyncio.to_thread(client.call, SVC, "Echo", KeyValue(key="2"), KeyValue)
            assert got.key == "2"
        finally:
            client.close()


async def test_idle_runs_while_waiting_and_once_after() -> None:
    async with serving() as (_, handlers, path):
        client = await asyncio.to_thread(BlockingClient.connect, path, timeout=5)
        calls: list[int] = []
        try:
            call = asyncio.create_task(
                asyncio.to_thread(
                    client.call,
                    SVC,
                    "Block",
                    KeyValue(key="b"),
                    KeyValue,
                    idle=lambda: calls.append(len(handlers.finished)),
                    idle_interval=0.01,
                )
            )
            while len(calls) < 3:
                await asyncio.sleep(0.01)
            handlers.gate.set()
            assert (await call).key == "b"
        finally:
            client.close()
        assert calls[0] == 0 and calls[-1] == 1


async def test_deadline_and_lost_connection() -> None:
    async with serving() as (server, _, path):
        client = await asyncio.to_thread(BlockingClient.connect, path, timeout=5)
        try:
            with pytest.raises(TtrpcError) as err:
                await asyncio.to_thread(
                    client.call, SVC, "Block", KeyValue(key="slow"), KeyValue, timeout=0.1
                )
            assert err.value.code == Code.DEADLINE_EXCEEDED
            call = asyncio.create_task(
                asyncio.to_thread(client.call, SVC, "Block", KeyValue(key="x"), KeyValue)
            )
            await asyncio.sleep(0.05)
            server.close()
            with pytest.raises(ConnectionClosedError):
                await call
            assert client.closed
        finally:
            client.close()


def test_connect_to_nothing() -> None:
    with pytest.raises(ConnectionRefusedError):
        BlockingClient.connect(abstract_name(), timeout=1)


def test_cli_imports_no_asyncio() -> None:
    """The blocking commands' whole point: the CLI module loads without asyncio."""
    code = "import sys, manager.cli; sys.exit('asyncio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
