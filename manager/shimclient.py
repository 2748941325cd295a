"""The task API as the manager calls it: one ttrpc connection per container's shim."""

from __future__ import annotations

from typing import TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from manager.paths import NAMESPACE
from protocol.proto.task.v2 import shim_pb2
from protocol.ttrpc.address import dial_path
from protocol.ttrpc.client import Client
from protocol.ttrpc.status import Code, TtrpcError

TASK_SERVICE = "containerd.task.v2.Task"
# containerd's budgets: shim.load for Connect, task.state for State, shim.shutdown.
CONNECT_TIMEOUT = 5.0
STATE_TIMEOUT = 2.0
SHUTDOWN_TIMEOUT = 3.0
# Calls without a containerd bound still get one, so a wedged shim cannot hang the CLI.
CALL_TIMEOUT = 30.0
# A dump or restore under CRIU takes as long as the container's memory needs.
CHECKPOINT_TIMEOUT = 600.0
# A shim just started: its `start` returns once the socket is bound, before its daemon
# serves. Until the daemon's first answer a call waits for the daemon, not a fixed
# short time: a daemon that dies takes its listener along, which fails the call at
# once, so this bound only catches one that is alive and wedged. (In a loaded qemu
# TCG guest a daemon forked in 1.1 s had not answered Connect after 11 s.)
FIRST_ANSWER_TIMEOUT = 120.0
R = TypeVar("R", bound=Message)
_METADATA = {"containerd-namespace-ttrpc": NAMESPACE}


class ShimClient:
    def __init__(self, client: Client, address: str, fresh: bool = False) -> None:
        self._client = client
        self.address = address
        self._fresh = fresh

    @classmethod
    async def dial(cls, address: str, *, fresh: bool = False) -> ShimClient:
        """A client of the shim at ``address``; ``fresh``: a shim just started, whose
        first answer may take up to FIRST_ANSWER_TIMEOUT."""
        client = await Client.connect(dial_path(address), timeout=CONNECT_TIMEOUT)
        return cls(client, address, fresh)

    @property
    def closed(self) -> bool:
        return self._client.closed

    def close(self) -> None:
        self._client.close()

    async def wait_closed(self) -> None:
        await self._client.wait_closed()

    async def _call(self, method: str, req: Message, resp: type[R], timeout: float | None) -> R:
        if timeout is not None and self._fresh:
            timeout = max(timeout, FIRST_ANSWER_TIMEOUT)
        try:
            answer = await self._client.call(
                TASK_SERVICE, method, req, resp, timeout=timeout, metadata=_METADATA
            )
        except TtrpcError as exc:
            if exc.code != Code.DEADLINE_EXCEEDED:
                self._fresh = False  # it answered, with an error
                raise
            # ttrpc's own words name neither the call nor the wait.
            raise TtrpcError(
                exc.code, f"shim {method}: {exc.message} (no answer in {timeout:g} s)"
            ) from exc
        self._fresh = False
        return answer

    async def connect(self, container_id: str) -> shim_pb2.ConnectResponse:
        req = shim_pb2.ConnectRequest(id=container_id)
        return await self._call("Connect", req, shim_pb2.ConnectResponse, CONNECT_TIMEOUT)

    async def create(self, req: shim_pb2.CreateTaskRequest) -> shim_pb2.CreateTaskResponse:
        return await self._call("Create", req, shim_pb2.CreateTaskResponse, CALL_TIMEOUT)

    async def start(
        self, container_id: str, exec_id: str = "", *, timeout: float = CALL_TIMEOUT
    ) -> shim_pb2.StartResponse:
        req = shim_pb2.StartRequest(id=container_id, exec_id=exec_id)
        return await self._call("Start", req, shim_pb2.StartResponse, timeout)

    async def state(self, container_id: str, exec_id: str = "") -> shim_pb2.StateResponse:
        req = shim_pb2.StateRequest(id=container_id, exec_id=exec_id)
        return await self._call("State", req, shim_pb2.StateResponse, STATE_TIMEOUT)

    async def wait(self, container_id: str, exec_id: str = "") -> shim_pb2.WaitResponse:
        # No deadline: it returns when the process exits, however long that takes.
        req = shim_pb2.WaitRequest(id=container_id, exec_id=exec_id)
        return await self._call("Wait", req, shim_pb2.WaitResponse, None)

    async def kill(
        self, container_id: str, signal: int, *, exec_id: str = "", all: bool = False
    ) -> None:
        req = shim_pb2.KillRequest(id=container_id, exec_id=exec_id, signal=signal, all=all)
        await self._call("Kill", req, empty_pb2.Empty, CALL_TIMEOUT)

    async def exec(self, req: shim_pb2.ExecProcessRequest) -> None:
        await self._call("Exec", req, empty_pb2.Empty, CALL_TIMEOUT)

    async def resize(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        req = shim_pb2.ResizePtyRequest(
            id=container_id, exec_id=exec_id, width=width, height=height
        )
        await self._call("ResizePty", req, empty_pb2.Empty, CALL_TIMEOUT)

    async def close_io(self, container_id: str, exec_id: str = "") -> None:
        req = shim_pb2.CloseIORequest(id=container_id, exec_id=exec_id, stdin=True)
        await self._call("CloseIO", req, empty_pb2.Empty, CALL_TIMEOUT)

    async def delete(self, container_id: str, exec_id: str = "") -> shim_pb2.DeleteResponse:
        req = shim_pb2.DeleteRequest(id=container_id, exec_id=exec_id)
        return await self._call("Delete", req, shim_pb2.DeleteResponse, CALL_TIMEOUT)

    async def pause(self, container_id: str) -> None:
        req = shim_pb2.PauseRequest(id=container_id)
        await self._call("Pause", req, empty_pb2.Empty, CALL_TIMEOUT)

    async def resume(self, container_id: str) -> None:
        req = shim_pb2.ResumeRequest(id=container_id)
        await self._call("Resume", req, empty_pb2.Empty, CALL_TIMEOUT)

    async def checkpoint(
        self, container_id: str, path: str, *, exit: bool, terminal: bool = False
    ) -> None:
        from protocol.proto import anyutil
        from protocol.proto.runc import options_pb2

        # terminal: CRIU must take the container's pty, whose master is the shim's.
        opts = options_pb2.CheckpointOptions(exit=exit, terminal=terminal)
        options = anyutil.pack(opts)
        req = shim_pb2.CheckpointTaskRequest(id=container_id, path=path, options=options)
        # CRIU writes every page of the container's memory: no short deadline.
        await self._call("Checkpoint", req, empty_pb2.Empty, CHECKPOINT_TIMEOUT)

    async def pids(self, container_id: str) -> shim_pb2.PidsResponse:
        req = shim_pb2.PidsRequest(id=container_id)
        return await self._call("Pids", req, shim_pb2.PidsResponse, CALL_TIMEOUT)

    async def stats(self, container_id: str) -> shim_pb2.StatsResponse:
        req = shim_pb2.StatsRequest(id=container_id)
        return await self._call("Stats", req, shim_pb2.StatsResponse, CALL_TIMEOUT)

    async def shutdown(self, container_id: str) -> None:
        req = shim_pb2.ShutdownRequest(id=container_id)
        await self._call("Shutdown", req, empty_pb2.Empty, SHUTDOWN_TIMEOUT)
