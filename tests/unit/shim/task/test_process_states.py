"""Every illegal transition of init and exec, with the reference's exact code and text."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from protocol.proto.task.v2 import shim_pb2
from protocol.ttrpc.status import Code, TtrpcError
from tests.unit.shim.task.test_service import Harness, make_harness, settle

U, NF = Code.UNKNOWN, Code.NOT_FOUND

Op = Callable[[Harness], Awaitable[object]]

INIT_OPS: dict[str, Op] = {
    "start": lambda h: h.service.start(shim_pb2.StartRequest(id="c1")),
    "delete": lambda h: h.service.delete(shim_pb2.DeleteRequest(id="c1")),
    "pause": lambda h: h.service.pause(shim_pb2.PauseRequest(id="c1")),
    "resume": lambda h: h.service.resume(shim_pb2.ResumeRequest(id="c1")),
    "exec": lambda h: h.exec("c1", "ex"),
}

# state -> op -> (code, message); ops not listed are legal in that state.
INIT_ERRORS: dict[str, dict[str, tuple[Code, str]]] = {
    "created": {
        "pause": (U, "cannot pause task in created state"),
        "resume": (U, "cannot resume task in created state"),
    },
    "running": {
        "start": (U, "cannot start a running process"),
        "delete": (U, "cannot delete a running process"),
        "resume": (U, "cannot resume a running process"),
    },
    "paused": {
        "start": (U, "cannot start a paused process"),
        "delete": (U, "cannot delete a paused process"),
        "pause": (U, "cannot pause a paused container"),
        "exec": (U, "cannot exec in a paused state"),
    },
    "stopped": {
        "start": (U, "cannot start a stopped process"),
        "pause": (U, "cannot pause a stopped container"),
        "resume": (U, "cannot resume a stopped container"),
        "exec": (U, "cannot exec in a stopped state"),
    },
}


async def init_in(h: Harness, state: str) -> None:
    pid = await h.create()
    if state == "created":
        return
    await h.service.start(shim_pb2.StartRequest(id="c1"))
    if state == "paused":
        await h.service.pause(shim_pb2.PauseRequest(id="c1"))
    elif state == "stopped":
        h.reaper.exit(pid, 0)
        await asyncio.wait_for(h.service.wait(shim_pb2.WaitRequest(id="c1")), 5)


@pytest.mark.parametrize(
    ("state", "op"), [(s, o) for s, errors in INIT_ERRORS.items() for o in errors]
)
async def test_init_illegal_transitions(tmp_path: Path, state: str, op: str) -> None:
    h = make_harness(tmp_path)
    await init_in(h, state)
    calls_before = len(h.shared.calls)
    with pytest.raises(TtrpcError) as info:
        await INIT_OPS[op](h)
    assert (info.value.code, info.value.message) == INIT_ERRORS[state][op]
    assert len(h.shared.calls) == calls_before  # refused before runc is asked


@pytest.mark.parametrize(
    ("state", "op"),
    [(s, o) for s, errors in INIT_ERRORS.items() for o in INIT_OPS if o not in errors],
)
async def test_init_legal_transitions(tmp_path: Path, state: str, op: str) -> None:
    h = make_harness(tmp_path)
    await init_in(h, state)
    await INIT_OPS[op](h)


async def test_deleted_init_while_a_caller_still_holds_it(tmp_path: Path) -> None:
    h = make_harness(tmp_path)
    await h.create()
    init = h.service._containers["c1"].init
    await h.service.delete(shim_pb2.DeleteRequest(id="c1"))
    for aw, code, message in (
        (init.delete(), NF, "cannot delete a deleted process: not found"),
        (init.kill(9, False), NF, "cannot kill a deleted process: not found"),
        (init.start(), U, "cannot start a deleted process"),
        (init.pause(), U, "cannot pause a deleted process"),
        (init.resume(), U, "cannot resume a deleted process"),
        (init.update(b"{}"), U, "cannot update a deleted process"),
    ):
        with pytest.raises(TtrpcError) as info:
            await aw
        assert (info.value.code, info.value.message) == (code, message)


async def test_deleted_exec_while_a_caller_still_holds_it(tmp_path: Path) -> None:
    h = make_harness(tmp_path)
    await h.run()
    await h.exec()
    exec_ = h.service._containers["c1"].execs["e1"]
    await h.service.delete(shim_pb2.DeleteRequest(id="c1", exec_id="e1"))
    for aw, code, message in (
        (exec_.delete(), NF, "cannot delete a deleted process: not found"),
        (exec_.start(), U, "cannot start a deleted process"),
        (exec_.kill(9), NF, "process already finished: not found"),
    ):
        with pytest.raises(TtrpcError) as info:
            await aw
        assert (info.value.code, info.value.message) == (code, message)
    with pytest.raises(TtrpcError) as info:
        exec_.resize(1, 1)
    assert info.value.message == "cannot resize a deleted process"


async def test_concurrent_starts_run_runc_once(tmp_path: Path) -> None:
    h = make_harness(tmp_path)
    await h.create()
    h.shared.hooks["start"] = settle
    results = await asyncio.gather(
        h.service.start(shim_pb2.StartRequest(id="c1")),
        h.service.start(shim_pb2.StartRequest(id="c1")),
        return_exceptions=True,
    )
    assert h.shared.names().count("start") == 1
    errors = [r for r in results if isinstance(r, TtrpcError)]
    assert [e.message for e in errors] == ["cannot start a running process"]
