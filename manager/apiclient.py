"""The CLI's side of the manager API."""

from __future__ import annotations

from typing import TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from manager.paths import Paths
from protocol.proto.manager.v1 import manager_pb2 as pb
from protocol.ttrpc.client import Client

R = TypeVar("R", bound=Message)
# The API's ttrpc service name; here, not in service.py, so the CLI does not import the
# daemon's side (supervisor, images, registry...) to learn it.
MANAGER_SERVICE = "pyshim.manager.v1.Manager"
CONNECT_TIMEOUT = 5.0


class ManagerNotRunning(Exception):
    pass


class ManagerClient:
    def __init__(self, client: Client) -> None:
        self._client = client

    @classmethod
    async def connect(cls, paths: Paths) -> ManagerClient:
        try:
            client = await Client.connect(str(paths.socket), timeout=CONNECT_TIMEOUT)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ManagerNotRunning(
                f"pyshimd is not running (nothing answers on {paths.socket}).\n"
                f"Start it as root with:  pyshimd --run-dir {paths.run_dir} "
                f"--state-dir {paths.state_dir} &"
            ) from exc
        except PermissionError as exc:
            raise ManagerNotRunning(
                f"permission denied on {paths.socket}: run pyshim as root "
                "(or as a member of the group given to pyshimd --group)"
            ) from exc
        return cls(client)

    def close(self) -> None:
        self._client.close()

    async def call(self, method: str, req: Message, resp: type[R]) -> R:
        return await self._client.call(MANAGER_SERVICE, method, req, resp)

    async def empty(self, method: str, req: Message) -> None:
        await self._client.call(MANAGER_SERVICE, method, req, empty_pb2.Empty)

    async def inspect(self, ref: str) -> pb.InspectResponse:
        return await self.call("Inspect", pb.InspectRequest(container=ref), pb.InspectResponse)

    async def wait(self, ref: str, exec_id: str = "") -> pb.WaitResponse:
        req = pb.WaitRequest(container=ref, exec_id=exec_id)
        return await self.call("Wait", req, pb.WaitResponse)
