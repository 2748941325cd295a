"""Our ttrpc against Debian's Go ttrpc (the line containerd 1.6 uses), both ways.

The Go peer is tests/go/ttrpcpeer, built here; a build failure fails the tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from google.protobuf import empty_pb2, wrappers_pb2

from protocol.ttrpc.client import Client
from protocol.ttrpc.server import Server
from protocol.ttrpc.status import Code, TtrpcError
from tests.support.ttrpcpeer import SERVICE, EchoService, build_go_peer, go_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def peer_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_go_peer(tmp_path_factory.mktemp("gopeer"))


@pytest.fixture
def go_socket(peer_binary: Path, tmp_path: Path) -> Iterator[Path]:
    sock = tmp_path / "go.sock"
    with go_server(peer_binary, sock):
        yield sock


def big_payload() -> bytes:
    return bytes((i * 7) & 0xFF for i in range(1 << 20))


# ---------------------------------------------------------------- Python client -> Go server


async def test_py_client_concurrent_calls_complete_out_of_order(go_socket: Path) -> None:
    async with await Client.connect(str(go_socket), timeout=5) as client:
        order: list[int] = []

        async def sleep(ms: int) -> int:
            resp = await client.call(
                SERVICE, "Sleep", wrappers_pb2.Int64Value(value=ms), wrappers_pb2.Int64Value
            )
            order.append(ms)
            return resp.value

        tasks = []
        for ms in (600, 400, 200, 0):
            tasks.append(asyncio.create_task(sleep(ms)))
            await asyncio.sleep(0.03)
        values = await asyncio.gather(*tasks)
    assert values == [600, 400, 200, 0]
    assert order == [0, 200, 400, 600]


async def test_py_client_large_echo(go_socket: Path) -> None:
    payload = big_payload()
    async with await Client.connect(str(go_socket), timeout=5) as client:
        resp = await client.call(
            SERVICE, "Echo", wrappers_pb2.BytesValue(value=payload), wrappers_pb2.BytesValue
        )
    assert hashlib.sha256(resp.value).digest() == hashlib.sha256(payload).digest()


@pytest.mark.parametrize(
    ("code", "message"),
    [(5, "container not created: not found"), (9, "précondition ✗ failed")],
)
async def test_py_client_error_status(go_socket: Path, code: int, message: str) -> None:
    async with await Client.connect(str(go_socket), timeout=5) as client:
        with pytest.raises(TtrpcError) as info:
            await client.call(
                SERVICE,
                "Fail",
                wrappers_pb2.StringValue(value=f"{code} {message}"),
                empty_pb2.Empty,
            )
        assert (info.value.code, info.value.message) == (code, message)
        # The connection survives an error status.
        resp = await client.call(
            SERVICE, "Echo", wrappers_pb2.BytesValue(value=b"ok"), wrappers_pb2.BytesValue
        )
        assert resp.value == b"ok"


@pytest.mark.parametrize(
    ("service", "method", "message"),
    [(SERVICE, "Bogus", "method Bogus"), ("foo.Bar", "Echo", "service foo.Bar")],
)
async def test_py_client_unknown_method(
    go_socket: Path, service: str, method: str, message: str
) -> None:
    async with await Client.connect(str(go_socket), timeout=5) as client:
        with pytest.raises(TtrpcError) as info:
            await client.call(service, method, empty_pb2.Empty(), empty_pb2.Empty)
    assert info.value.code == 12
    assert info.value.code is Code.UNIMPLEMENTED
    assert info.value.message == message


async def test_py_client_metadata(go_socket: Path) -> None:
    async with await Client.connect(str(go_socket), timeout=5) as client:
        resp = await client.call(
            SERVICE,
            "Metadata",
            empty_pb2.Empty(),
            wrappers_pb2.StringValue,
            metadata={"containerd-namespace-ttrpc": "default", "x-multi": ["one", "two"]},
        )
    assert json.loads(resp.value) == {
        "containerd-namespace-ttrpc": ["default"],
        "x-multi": ["one", "two"],
    }


async def test_py_client_deadline_is_sent(go_socket: Path) -> None:
    async with await Client.connect(str(go_socket), timeout=5) as client:
        with_deadline = await client.call(
            SERVICE, "Deadline", empty_pb2.Empty(), wrappers_pb2.StringValue, timeout=2.0
        )
        without = await client.call(
            SERVICE, "Deadline", empty_pb2.Empty(), wrappers_pb2.StringValue
        )
    info = json.loads(with_deadline.value)
    assert info["has_deadline"] is True
    assert 1000 < info["remaining_ms"] <= 2000
    assert json.loads(without.value)["has_deadline"] is False


async def test_py_client_deadline_exceeded(go_socket: Path) -> None:
    async with await Client.connect(str(go_socket), timeout=5) as client:
        start = time.monotonic()
        with pytest.raises(TtrpcError) as info:
            await client.call(
                SERVICE,
                "Sleep",
                wrappers_pb2.Int64Value(value=5000),
                wrappers_pb2.Int64Value,
                timeout=0.3,
            )
        elapsed = time.monotonic() - start
        assert info.value.code == Code.DEADLINE_EXCEEDED
        assert 0.25 < elapsed < 2.0
        # A late (or deadline) answer from the server must not confuse the next call.
        await asyncio.sleep(0.2)
        resp = await client.call(
            SERVICE, "Echo", wrappers_pb2.BytesValue(value=b"after"), wrappers_pb2.BytesValue
        )
        assert resp.value == b"after"


async def py_client_mixed(sock: Path) -> None:
    """Several of the above at once on one connection."""
    async with await Client.connect(str(sock), timeout=5) as client:
        echo = client.call(
            SERVICE, "Echo", wrappers_pb2.BytesValue(value=big_payload()), wrappers_pb2.BytesValue
        )
        slow = client.call(
            SERVICE, "Sleep", wrappers_pb2.Int64Value(value=300), wrappers_pb2.Int64Value
        )
        fail = client.call(
            SERVICE, "Fail", wrappers_pb2.StringValue(value="6 exists"), empty_pb2.Empty
        )
        bogus = client.call(SERVICE, "Bogus", empty_pb2.Empty(), empty_pb2.Empty)
        md = client.call(
            SERVICE, "Metadata", empty_pb2.Empty(), wrappers_pb2.StringValue, metadata={"k": "v"}
        )
        results = await asyncio.gather(echo, slow, fail, bogus, md, return_exceptions=True)
    assert isinstance(results[0], wrappers_pb2.BytesValue)
    assert results[0].value == big_payload()
    assert isinstance(results[1], wrappers_pb2.Int64Value)
    assert results[1].value == 300
    assert isinstance(results[2], TtrpcError)
    assert (results[2].code, results[2].message) == (6, "exists")
    assert isinstance(results[3], TtrpcError)
    assert (results[3].code, results[3].message) == (12, "method Bogus")
    assert isinstance(results[4], wrappers_pb2.StringValue)
    assert json.loads(results[4].value) == {"k": ["v"]}


async def test_py_client_mixed(go_socket: Path) -> None:
    await py_client_mixed(go_socket)


def test_py_client_mixed_on_uvloop(go_socket: Path) -> None:
    uvloop.run(py_client_mixed(go_socket))


# ---------------------------------------------------------------- Go client -> Python server


async def run_go_client(binary: Path, sock: Path) -> dict[str, list[dict[str, Any]]]:
    proc = await asyncio.create_subprocess_exec(
        str(binary),
        "client",
        "-socket",
        str(sock),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    cases: dict[str, list[dict[str, Any]]] = {}
    for line in out.decode().splitlines():
        record = json.loads(line)
        cases.setdefault(record["case"], []).append(record)
    return cases


async def test_go_client_against_python_server(peer_binary: Path, tmp_path: Path) -> None:
    await go_client_scenario(peer_binary, tmp_path)


def test_go_client_against_python_server_on_uvloop(peer_binary: Path, tmp_path: Path) -> None:
    # The shim serves on uvloop, whose transports are not asyncio.Transport subclasses.
    uvloop.run(go_client_scenario(peer_binary, tmp_path))


async def go_client_scenario(peer_binary: Path, tmp_path: Path) -> None:
    service = EchoService()
    server = Server()
    server.register(SERVICE, service.methods())
    sock = tmp_path / "py.sock"
    await server.serve_path(str(sock))
    try:
        cases = await run_go_client(peer_binary, sock)
        # The Go client gives up at its own deadline; the server side must cancel the
        # handler at the deadline it was sent, not keep it running for 5 s.
        async with asyncio.timeout(2):
            while not service.cancelled:
                await asyncio.sleep(0.01)
    finally:
        await server.shutdown(timeout=5)

    (concurrent,) = cases["concurrent"]
    assert concurrent["ok"], concurrent
    assert concurrent["order"] == ["sleep0", "sleep200", "sleep400", "sleep600"]
    assert concurrent["values"] == {"sleep0": 0, "sleep200": 200, "sleep400": 400, "sleep600": 600}

    (large,) = cases["echo_large"]
    assert (large["ok"], large["len"], large["intact"]) == (True, 1 << 20, True)

    fails = {(c["code"], c["message"]) for c in cases["fail"]}
    assert fails == {(5, "container not created: not found"), (9, "précondition ✗ failed")}

    (unknown_method,) = cases["unknown_method"]
    assert (unknown_method["code"], unknown_method["message"]) == (12, "method Bogus")
    (unknown_service,) = cases["unknown_service"]
    assert (unknown_service["code"], unknown_service["message"]) == (12, "service foo.Bar")

    (metadata,) = cases["metadata"]
    expected_md = {"containerd-namespace-ttrpc": ["default"], "x-multi": ["one", "two"]}
    assert metadata["received"] == expected_md
    assert service.metadata_seen == [expected_md]

    deadlines = {c["timeout_ms"]: c["received"] for c in cases["deadline"]}
    assert deadlines[0]["has_deadline"] is False
    assert deadlines[2000]["has_deadline"] is True
    assert 1000 < deadlines[2000]["remaining_ms"] <= 2000

    (exceeded,) = cases["deadline_exceeded"]
    assert exceeded["ok"] is False
    # Go's client returns whichever comes first: its own context error, or our status 4.
    assert exceeded["is_deadline"] or exceeded["code"] == Code.DEADLINE_EXCEEDED, exceeded
    assert 250 <= exceeded["elapsed_ms"] < 2000
    (cancelled,) = service.cancelled
    assert (cancelled.sleep_ms, cancelled.had_deadline) == (5000, True)
    assert 0.2 < cancelled.after_s < 1.5

    (after,) = cases["after"]
    assert (after["ok"], after["value"]) == (True, "still alive")
