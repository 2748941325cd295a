"""The CLI's side of the manager API: over the asyncio ttrpc client, or (for the
commands that need no event loop) over the blocking one, which starts ~30 ms sooner."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from manager.paths import Paths
from protocol.proto.manager.v1 import manager_pb2 as pb
from protocol.ttrpc.blocking import BlockingClient

if TYPE_CHECKING:
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

    blocking = False

    @classmethod
    async def connect(cls, paths: Paths) -> ManagerClient:
        # Imported by those who use it: it brings asyncio.
        from protocol.ttrpc.client import Client

        try:
            client = await Client.connect(str(paths.socket), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            _raise_not_running(paths, exc)
            raise
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


class BlockingManagerClient(ManagerClient):
    """The same calls, answered before ``call`` returns: its coroutines never suspend,
    so a command written for ManagerClient runs to the end on one ``send(None)``
    (cli.drive) without asyncio."""

    blocking = True

    def __init__(self, client: BlockingClient) -> None:
        self._blocking = client

    @classmethod
    def connect_blocking(cls, paths: Paths) -> BlockingManagerClient:
        try:
            client = BlockingClient.connect(str(paths.socket), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            _raise_not_running(paths, exc)
            raise
        return cls(client)

    def close(self) -> None:
        self._blocking.close()

    async def call(self, method: str, req: Message, resp: type[R]) -> R:
        return self._blocking.call(MANAGER_SERVICE, method, req, resp)

    async def empty(self, method: str, req: Message) -> None:
        self._blocking.call(MANAGER_SERVICE, method, req, empty_pb2.Empty)

    def wait_while(
        self, ref: str, exec_id: str, idle: Callable[[], object], interval: float
    ) -> pb.WaitResponse:
        """Wait, calling ``idle`` every ``interval`` seconds meanwhile and once after."""
        req = pb.WaitRequest(container=ref, exec_id=exec_id)
        return self._blocking.call(
            MANAGER_SERVICE, "Wait", req, pb.WaitResponse, idle=idle, idle_interval=interval
        )


def _raise_not_running(paths: Paths, exc: OSError) -> None:
    """ManagerNotRunning for the errors that mean it; others stay as they are."""
    err = _not_running(paths, exc)
    if err is not None:
        raise err from exc


def _not_running(paths: Paths, exc: OSError) -> ManagerNotRunning | None:
    if isinstance(exc, PermissionError):
        return ManagerNotRunning(
            f"permission denied on {paths.socket}: run pyshim as root "
            "(or as a member of the group given to pyshimd --group)"
        )
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        return ManagerNotRunning(
            f"pyshimd is not running (nothing answers on {paths.socket}).\n"
            f"Start it as root with:  pyshimd --run-dir {paths.run_dir} "
            f"--state-dir {paths.state_dir} &"
        )
    return None
