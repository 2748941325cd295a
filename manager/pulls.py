"""pyshimd's pulls: one worker thread per image being pulled (a second request for the
same image waits for the first), progress for the CLI, and registry logins.

Logins are kept in ``<state>/auth.json`` (0600, root's like the rest of the state dir).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import msgspec

from manager import registry
from manager.images import ImageEntry, ImageStore
from manager.records import write_atomic


class _Login(msgspec.Struct):
    username: str
    password: str


class Puller:
    def __init__(self, images: ImageStore, state_dir: Path, certs_dir: Path) -> None:
        self.images = images
        self.auth_path = state_dir / "auth.json"
        self.certs_dir = certs_dir
        self.blobs_dir = images.root / "blobs" / "sha256"
        self._running: dict[str, asyncio.Task[ImageEntry]] = {}
        self._progress: dict[str, registry.Progress] = {}

    def _logins(self) -> dict[str, _Login]:
        try:
            return msgspec.json.decode(self.auth_path.read_bytes(), type=dict[str, _Login])
        except FileNotFoundError:
            return {}

    def _credentials(self, host: str) -> registry.Credentials | None:
        login = self._logins().get(host)
        return registry.Credentials(login.username, login.password) if login else None

    async def login(self, host: str, username: str, password: str) -> None:
        """Checked against the registry before it is kept."""
        creds = registry.Credentials(username, password)
        client = registry.RegistryClient(host, certs_dir=self.certs_dir, credentials=creds)
        await asyncio.to_thread(client.check)
        logins = self._logins()
        logins[host] = _Login(username, password)
        write_atomic(self.auth_path, msgspec.json.encode(logins))

    def progress(self, ref: str) -> registry.Progress | None:
        with contextlib.suppress(registry.RegistryError):
            return self._progress.get(registry.Reference.parse(ref).name)
        return None

    async def pull(self, ref_text: str) -> ImageEntry:
        ref = registry.Reference.parse(ref_text)
        task = self._running.get(ref.name)
        if task is None:
            progress = registry.Progress(ref=ref.name)
            self._progress[ref.name] = progress
            task = asyncio.create_task(self._pull(ref, progress))
            self._running[ref.name] = task
            task.add_done_callback(lambda _: self._running.pop(ref.name, None))
        return await asyncio.shield(task)

    async def _pull(self, ref: registry.Reference, progress: registry.Progress) -> ImageEntry:
        try:
            digest, config, files = await asyncio.to_thread(
                registry.pull,
                ref,
                self.blobs_dir,
                progress,
                certs_dir=self.certs_dir,
                credentials=self._credentials(ref.host),
            )
            for layer in progress.layers:
                layer.state = "unpacking"
            entry = await asyncio.to_thread(self.images.add_pulled, ref.name, digest, config, files)
            for layer in progress.layers:
                layer.state = "done"
            # Unpacked: the compressed copies are of no further use.
            for f in files:
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
            return entry
        except BaseException as exc:
            progress.error = str(exc)
            raise
        finally:
            progress.finished = True
