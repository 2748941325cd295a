"""Running the shim binary as containerd does: `start` per container, `delete` for dead ones."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from manager.paths import NAMESPACE, Paths
from protocol.proto.task.v2 import shim_pb2

SHIM_BINARY_NAME = "containerd-shim-pyshim-v1"
# containerd's io.containerd.timeout.shim.cleanup; `start` has no containerd bound, ours
# exists so a wedged shim cannot hang a `pyshim run` forever.
START_TIMEOUT = 30.0
DELETE_TIMEOUT = 5.0


class ShimLaunchError(Exception):
    pass


def find_shim_binary(explicit: str | None = None) -> str:
    """Flag, else next to our own interpreter (the venv's bin), else PATH."""
    if explicit:
        return str(Path(explicit).absolute())
    beside = Path(sys.executable).parent / SHIM_BINARY_NAME
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(SHIM_BINARY_NAME)
    if found is None:
        raise ShimLaunchError(f"{SHIM_BINARY_NAME} not found on PATH; install pyshim first")
    return found


@dataclass(frozen=True)
class ShimLauncher:
    binary: str
    paths: Paths
    publish_binary: str

    def _base_argv(self, container_id: str) -> list[str]:
        return [
            self.binary,
            "-namespace",
            NAMESPACE,
            "-address",
            str(self.paths.socket),
            "-publish-binary",
            self.publish_binary,
            "-id",
            container_id,
        ]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["TTRPC_ADDRESS"] = str(self.paths.events_socket)
        return env

    async def _run(
        self, container_id: str, action: list[str], *, cwd: Path, timeout: float, merge: bool
    ) -> tuple[int, bytes, bytes]:
        """Run the shim binary as containerd does (own process group, our env), killing
        it at ``timeout``; stderr goes into stdout when ``merge``."""
        proc = await asyncio.create_subprocess_exec(
            *self._base_argv(container_id),
            *action,
            cwd=cwd,
            env=self._env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT if merge else asyncio.subprocess.PIPE,
            process_group=0,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise ShimLaunchError(f"shim {action[-1]} for {container_id} timed out") from None
        assert proc.returncode is not None
        return proc.returncode, out, err or b""

    async def start(self, container_id: str, bundle: Path) -> str:
        """Run ``start``; returns the address it printed (stdout and stderr combined, as
        containerd reads them, so a stray warning shows up in the error rather than
        silently becoming part of an address)."""
        code, out, _ = await self._run(
            container_id, ["start"], cwd=bundle, timeout=START_TIMEOUT, merge=True
        )
        text = out.decode(errors="replace").strip()
        if code != 0:
            raise ShimLaunchError(f"shim start failed: {text}: exit status {code}")
        if not text:
            raise ShimLaunchError("shim start printed no address")
        return text

    async def delete(self, container_id: str, bundle: Path) -> shim_pb2.DeleteResponse:
        """Run ``delete`` for a shim that is gone; the shim kills and cleans what is left."""
        cwd = bundle if bundle.is_dir() else self.paths.run_dir
        code, out, err = await self._run(
            container_id,
            ["-bundle", str(bundle), "delete"],
            cwd=cwd,
            timeout=DELETE_TIMEOUT,
            merge=False,
        )
        if code != 0:
            msg = err.decode(errors="replace").strip()
            raise ShimLaunchError(f"shim delete failed: exit status {code}: {msg}")
        resp = shim_pb2.DeleteResponse()
        try:
            resp.ParseFromString(out)
        except Exception as exc:
            raise ShimLaunchError(
                f"shim delete printed an unreadable DeleteResponse: {exc}"
            ) from exc
        return resp
