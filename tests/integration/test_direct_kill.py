"""Kill of an init this shim created signals it directly; everything else stays runc's.

A real shim daemon, real runc behind a wrapper that logs each command, so the tests
see which kills ran `runc kill` and that the signals took effect.
"""

from __future__ import annotations

import asyncio
import signal

import pytest
from google.protobuf import empty_pb2

from protocol.proto.task.v2 import shim_pb2
from protocol.proto.types import task_pb2 as types_pb2
from protocol.ttrpc.status import Code, TtrpcError
from tests.integration.test_shim_recovery import ShimRig, shim_rig

pytestmark = pytest.mark.integration


async def kill(rig: ShimRig, sig: int, *, all: bool = False) -> None:
    req = shim_pb2.KillRequest(id=rig.cid, signal=sig, all=all)
    await rig.call("Kill", req, empty_pb2.Empty)


async def delete(rig: ShimRig) -> None:
    await rig.call("Delete", shim_pb2.DeleteRequest(id=rig.cid), shim_pb2.DeleteResponse)


async def test_running_init_is_killed_without_runc_and_then_not_found() -> None:
    async with shim_rig("dk1", ["sleep", "300"]) as rig:
        await rig.start_daemon()
        runc, runc_log = rig.logging_runc()
        await rig.create_and_start(runc)
        await kill(rig, 0)
        assert (await rig.state()).status == types_pb2.RUNNING
        await kill(rig, signal.SIGKILL)
        assert (await rig.wait()).exit_status == 137
        assert rig.runc_kills(runc_log) == []

        with pytest.raises(TtrpcError) as info:
            await kill(rig, signal.SIGKILL)
        assert (info.value.code, info.value.message) == (
            Code.NOT_FOUND,
            "process already finished: not found",
        )
        # A dead init is answered at once, as runc would ("container not running").
        assert rig.runc_kills(runc_log) == []
        # --all may still find processes in the cgroup: runc's.
        await kill(rig, signal.SIGKILL, all=True)
        assert rig.runc_kills(runc_log) == ["kill --all dk1 9"]
        await delete(rig)


async def test_created_init_is_killed_without_runc() -> None:
    async with shim_rig("dk2", ["sleep", "300"]) as rig:
        await rig.start_daemon()
        runc, runc_log = rig.logging_runc()
        await rig.create(runc)
        await kill(rig, signal.SIGKILL)
        assert (await rig.wait()).exit_status == 137
        assert rig.runc_kills(runc_log) == []
        await delete(rig)


async def test_kill_all_and_paused_init_go_through_runc() -> None:
    async with shim_rig("dk3", ["sleep", "300"]) as rig:
        await rig.start_daemon()
        runc, runc_log = rig.logging_runc()
        await rig.create_and_start(runc)
        await kill(rig, 0, all=True)
        assert rig.runc_kills(runc_log) == ["kill --all dk3 0"]
        await rig.call("Pause", shim_pb2.PauseRequest(id=rig.cid), empty_pb2.Empty)
        assert (await rig.state()).status == types_pb2.PAUSED
        # runc thaws a frozen cgroup v1 after SIGKILL; a bare os.kill would not.
        await kill(rig, signal.SIGKILL)
        assert rig.runc_kills(runc_log) == ["kill --all dk3 0", "kill dk3 9"]
        assert (await rig.wait()).exit_status == 137
        await delete(rig)


async def test_kill_of_a_dead_init_during_a_slow_delete_is_answered_at_once() -> None:
    # CRI's StopContainer sends SIGKILL once its timeout passes, which may be while
    # containerd deletes the exited task; containerd 1.7 closes the connection as soon
    # as Delete answers, so a Kill still waiting on runc would fail with "ttrpc: closed".
    async with shim_rig("dk4", ["sleep", "300"]) as rig:
        await rig.start_daemon()
        runc, runc_log = rig.logging_runc()
        deleting, gate = rig.tmp / "deleting", rig.tmp / "gate"
        slow = rig.tmp / "slow-delete-runc"
        slow.write_text(
            "#!/bin/sh\n"
            f'case " $* " in *" delete "*) touch {deleting}\n'
            f"  while [ ! -e {gate} ]; do sleep 0.05; done;; esac\n"
            f'exec {runc} "$@"\n'
        )
        slow.chmod(0o755)
        await rig.create_and_start(str(slow))
        await kill(rig, signal.SIGKILL)
        assert (await rig.wait()).exit_status == 137
        delete_call = asyncio.create_task(delete(rig))
        try:
            async with asyncio.timeout(30):
                while not deleting.exists():
                    await asyncio.sleep(0.05)
            with pytest.raises(TtrpcError) as info:
                await kill(rig, signal.SIGKILL)
            assert (info.value.code, info.value.message) == (
                Code.NOT_FOUND,
                "process already finished: not found",
            )
            assert not delete_call.done()
            assert rig.runc_kills(runc_log) == []
        finally:
            gate.touch()
            await delete_call
