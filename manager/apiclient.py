"""The CLI's side of the manager API: over the asyncio ttrpc client, or (for the
commands that need no event loop) over the blocking one, which starts ~30 ms sooner.

The calls here take LiteMessages (manager_lite) or generated classes alike; the CLI
uses LiteMessages only, so it never imports protobuf.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from manager.paths import Paths, socket_path
from protocol.proto.manager.v1 import manager_lite as lite
from protocol.ttrpc.blocking import BlockingClient

if TYPE_CHECKING:
    from collections.abc import Callable

    from protocol.proto.lite import WireMessage
    from protocol.ttrpc.client import Client

R = TypeVar("R", bound="WireMessage")
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
    async def connect(cls, run_dir: str | None, state_dir: str | None) -> ManagerClient:
        """pyshimd at the run dir the flags (or the environment) name."""
        # Imported by those who use it: it brings asyncio.
        from protocol.ttrpc.client import Client

        try:
            client = await Client.connect(socket_path(run_dir), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            _raise_not_running(run_dir, state_dir, exc)
            raise
        return cls(client)

    def close(self) -> None:
        self._client.close()

    async def call(self, method: str, req: WireMessage, resp: type[R]) -> R:
        return await self._client.call(MANAGER_SERVICE, method, req, resp)

    async def empty(self, method: str, req: WireMessage) -> None:
        await self.call(method, req, lite.Empty)

    async def inspect(self, ref: str) -> lite.InspectResponse:
        req = lite.InspectRequest(container=ref)
        return await self.call("Inspect", req, lite.InspectResponse)

    async def wait(self, ref: str, exec_id: str = "") -> lite.WaitResponse:
        req = lite.WaitRequest(container=ref, exec_id=exec_id)
        return await self.call("Wait", req, lite.WaitResponse)


class BlockingManagerClient(ManagerClient):
    """The same calls, answered before ``call`` returns: its coroutines never suspend,
    so a command written for ManagerClient runs to the end on one ``send(None)``
    (cli.drive) without asyncio."""

    blocking = True

    def __init__(self, client: BlockingClient) -> None:
        self._blocking = client

    @classmethod
    def connect_blocking(cls, run_dir: str | None, state_dir: str | None) -> BlockingManagerClient:
        try:
            client = BlockingClient.connect(socket_path(run_dir), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            _raise_not_running(run_dir, state_dir, exc)
            raise
        return cls(client)

    def close(self) -> None:
        self._blocking.close()

    async def call(self, method: str, req: WireMessage, resp: type[R]) -> R:
        return self._blocking.call(MANAGER_SERVICE, method, req, resp)

    def wait_while(
        self, ref: str, exec_id: str, idle: Callable[[], object], interval: float
    ) -> lite.WaitResponse:
        """Wait, calling ``idle`` every ``interval`` seconds meanwhile and once after."""
        req = lite.WaitRequest(container=ref, exec_id=exec_id)
        return self._blocking.call(
            MANAGER_SERVICE, "Wait", req, lite.WaitResponse, idle=idle, idle_interval=interval
        )


def _raise_not_running(run_dir: str | None, state_dir: str | None, exc: OSError) -> None:
    """ManagerNotRunning for the errors that mean it; others stay as they are."""
    err = _not_running(Paths.resolve(run_dir, state_dir), exc)
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
