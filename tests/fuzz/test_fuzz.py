"""Every fuzz target with a small budget, plus the regressions the campaigns found."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.ttrpc.connection import ErrorReply, ServerConnection
from protocol.ttrpc.frame import HEADER_SIZE, MAX_MESSAGE_SIZE, MessageType
from protocol.ttrpc.messages import RequestMessage, decode_response, encode_request
from protocol.ttrpc.server import Method
from protocol.ttrpc.status import Code
from tests.fuzz.runner import FuzzFinding, run_random, run_target
from tests.fuzz.targets import METHODS, SERVICES, TARGETS, ServiceFuzzer, _header

# Per target; the whole module stays well under 30 s on a loaded 2-core machine.
HYPOTHESIS_CASES = 120
RANDOM_CASES = 2000


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_hypothesis_engine(name: str) -> None:
    result = run_target(name, HYPOTHESIS_CASES)
    assert result.cases >= HYPOTHESIS_CASES // 2


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_random_engine(name: str) -> None:
    assert run_random(name, RANDOM_CASES, seed=7).cases == RANDOM_CASES


def test_random_engine_reports_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    # The campaign must stop loudly, naming seed, case and input, on a failing check.
    target = TARGETS["envelopes"]

    def broken(case: object) -> None:
        raise AssertionError("boom")

    monkeypatch.setitem(TARGETS, "envelopes", target._replace(check=broken))
    with pytest.raises(FuzzFinding, match=r"envelopes: seed=3 case=0: AssertionError: boom"):
        run_random("envelopes", 5, seed=3)


def test_service_target_covers_every_task_method() -> None:
    with ServiceFuzzer() as fuzzer:
        fuzzer.check(("containerd.task.v2.Task", "Connect", b""))
        world = fuzzer._world
        assert world is not None
        registered: dict[str, dict[str, Method[Any, Any]]] = {}

        class Collect:
            def register(self, name: str, methods: dict[str, Method[Any, Any]]) -> None:
                registered[name] = methods

        world.harness.service.register(Collect())
    for methods in registered.values():
        assert {n: m.request_type for n, m in methods.items()} == METHODS


def test_service_target_detects_state_change_on_failure() -> None:
    # The "a refused call leaves no trace" invariant must be able to fire.
    with ServiceFuzzer() as fuzzer:
        fuzzer.check(("containerd.task.v2.Task", "Connect", b""))
        world = fuzzer._world
        assert world is not None
        original = world.harness.service.state

        async def meddling(req: object) -> object:
            world.harness.publisher.publish("/x", world.harness.publisher)
            return await original(req)

        world.harness.service.state = meddling
        with pytest.raises(AssertionError):
            fuzzer.check(("containerd.task.v2.Task", "State", b"\n\x05nope1"))


# ------------------------------------------------------------------ regressions


def _request_frame(req: RequestMessage, sid: int = 1) -> bytes:
    data = encode_request(req)
    return _header(len(data), sid, MessageType.REQUEST) + data


@pytest.mark.parametrize("char", ["a", "é", "€", "\U0001f600"])
def test_error_reply_with_huge_multibyte_text_fits_a_frame(char: str) -> None:
    # Finding: the status message was cut to max/2 *characters*, so a peer-chosen
    # service name of 3- or 4-byte characters produced a frame above the limit and
    # encode_frame raised inside next_event (the connection died, no answer sent).
    name = char * ((MAX_MESSAGE_SIZE - 64) // len(char.encode()))
    sm: ServerConnection[Method[Any, Any]] = ServerConnection(SERVICES)
    sm.receive_data(_request_frame(RequestMessage(service=name, method="Echo")))
    ev = sm.next_event()
    assert isinstance(ev, ErrorReply) and ev.code == Code.UNIMPLEMENTED
    assert len(ev.data) <= HEADER_SIZE + MAX_MESSAGE_SIZE
    resp = decode_response(ev.data[HEADER_SIZE:])
    assert resp.code == Code.UNIMPLEMENTED and resp.message.startswith("service " + char)


def test_failed_call_with_huge_multibyte_message_fits_a_frame() -> None:
    sm: ServerConnection[Method[Any, Any]] = ServerConnection(SERVICES)
    sm.receive_data(_request_frame(RequestMessage(service="fuzz.Svc", method="Echo")))
    call = sm.next_event()
    assert call is not None and not isinstance(call, ErrorReply)
    out = sm.fail_call(call.stream_id, Code.INVALID_ARGUMENT, "€" * (3 << 20))
    assert out is not None and len(out) <= HEADER_SIZE + MAX_MESSAGE_SIZE
    resp = decode_response(out[HEADER_SIZE:])
    assert resp.code == Code.INVALID_ARGUMENT and set(resp.message) == {"€"}
