"""Per-container records: msgspec JSON, written atomically (tmp + rename), synced or not.

What must be durable, and before what (docs/crash-recovery.md, "What pyshimd syncs"):
a process crash (pyshimd SIGKILLed) loses nothing that was written, synced or not,
since the page cache keeps it; only a kernel crash or power loss does, and that also
kills every container and shim. So a save is synced (file fsync, rename, directory
fsync) only when what it says must survive that and cannot be rebuilt at recovery:

- the first save of a container, before anything exists that only the record says
  how to undo (its state directory, log, writable layer, IP lease; the shim);
- the save before Run answers and the exit before waiters learn it, for a container
  that is kept (not --rm): ``ps -a``/``inspect`` show it after a reboot as they did;
- every other transition (stop, pause, restart policy, ...) as before.

The rest is a *snapshot* (``save(rec, durable=False)``): the same record in a file of
its own beside the durable one, renamed into place but never synced. Recovery reads
the snapshot when it is whole and newer (``seq``), else the durable record. So a
snapshot torn or zeroed by a power loss can never replace what was synced: at worst
recovery sees the last durable state, and rebuilds the rest from the shim (its
bundle's ``address``, State) or finds it moot (after a reboot no shim is alive).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import msgspec

from manager.paths import Paths

RECORD_VERSION = 1
# The unsynced snapshot beside record.json (RecordStore.save).
SNAPSHOT_NAME = "record.snapshot.json"
# A container directory being removed is first renamed to this + its id (RecordStore.retire).
RETIRED_PREFIX = ".removing-"


class MountSpec(msgspec.Struct, kw_only=True):
    """A rootfs mount handed to the shim's Create."""

    type: str
    source: str
    options: list[str] = msgspec.field(default_factory=list)


class PortSpec(msgspec.Struct, kw_only=True):
    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str = ""


class UserMount(msgspec.Struct, kw_only=True):
    """-v / --tmpfs as given: bind (host path), volume (name) or tmpfs."""

    type: str
    source: str
    destination: str
    readonly: bool = False
    options: str = ""


class ContainerRecord(msgspec.Struct, kw_only=True):
    version: int = RECORD_VERSION
    # Bumped by every save: the newer of the durable record and the snapshot wins.
    seq: int = 0
    id: str
    name: str
    bundle: str
    created_at_ns: int
    command: list[str]
    image: str = ""
    shim_address: str = ""
    shim_pid: int = 0
    pid: int = 0
    # created, running, stopped, unknown (shim unreachable, exit not learned)
    status: str = "created"
    exit_status: int | None = None
    exited_at_ns: int = 0
    # Set when exit_status is not what the process itself returned, and why.
    exit_reason: str = ""
    terminal: bool = False
    stdin: bool = False
    auto_remove: bool = False
    # The shim was torn down (Delete/Shutdown/delete subcommand); never reconnect.
    shim_gone: bool = False
    # When the current run started (exits from before it belong to an earlier run).
    started_at_ns: int = 0
    # What run was given, kept so a stopped container starts again the same way.
    rootfs_mounts: list[MountSpec] = msgspec.field(default_factory=list)
    stop_signal: int = 15
    # --restart: no, on-failure, always, unless-stopped; restart_max is on-failure's N.
    restart_policy: str = "no"
    restart_max: int = 0
    restart_count: int = 0
    # `stop` (not the container's own exit): no restart policy brings it back.
    manually_stopped: bool = False
    oom_killed: bool = False
    network: str = "none"
    ports: list[PortSpec] = msgspec.field(default_factory=list)
    ip_address: str = ""
    # The CNI result of ADD, which DEL is given back (CNI's prevResult).
    cni_result: dict[str, Any] = msgspec.field(default_factory=dict)
    # The CNI config ADD ran with (DEL must get the same); empty = no CNI network.
    cni_config: dict[str, Any] = msgspec.field(default_factory=dict)
    mounts: list[UserMount] = msgspec.field(default_factory=list)

    @property
    def exited(self) -> bool:
        return self.exit_status is not None


class RecordError(Exception):
    pass


def write_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """tmp + rename: a reader sees the old or the new file whole. ``durable``: the file
    and the rename are synced before this returns (else only a process crash is
    survived). A directory this creates is synced into its parent too."""
    created = _make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        # The rename lives in the directory; new directories live in their parents.
        for directory in (path.parent, *created):
            fsync_dir(directory)


def _make_dirs(directory: Path) -> list[Path]:
    """mkdir -p; the parents of the directories it made (each needs its entry synced)."""
    if directory.is_dir():
        return []
    parents = _make_dirs(directory.parent)
    try:
        directory.mkdir()
    except FileExistsError:
        return parents
    return [directory.parent, *parents]


def fsync_dir(directory: Path) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class RecordStore:
    def __init__(self, paths: Paths) -> None:
        self._paths = paths

    def _snapshot(self, container_id: str) -> Path:
        return self._paths.record(container_id).with_name(SNAPSHOT_NAME)

    def save(self, record: ContainerRecord, durable: bool = True) -> None:
        """``durable=False`` only for what recovery can do without after a power loss
        (module docstring); the first save of a container is always durable.

        Only the first save makes the container's directory: once it is gone the
        container was removed, and a save that comes after (a task that learned
        something late) writes nothing rather than bring a record of it back."""
        if record.seq and not self._paths.container_dir(record.id).is_dir():
            return
        record.seq += 1
        data = msgspec.json.encode(record)
        path = self._paths.record(record.id)
        if durable or not path.exists():
            write_atomic(path, data)
            # Older than what was just synced; gone so that nothing stale lingers.
            with contextlib.suppress(FileNotFoundError):
                self._snapshot(record.id).unlink()
        else:
            write_atomic(self._snapshot(record.id), data, durable=False)

    def load(self, container_id: str) -> ContainerRecord | None:
        """The durable record, or the snapshot when it is whole and newer."""
        try:
            snapshot = _read(self._snapshot(container_id))
        except RecordError:
            snapshot = None  # torn by a power loss: the durable record stands
        try:
            record = _read(self._paths.record(container_id))
        except RecordError:
            if snapshot is None:
                raise
            return snapshot
        if snapshot is not None and (record is None or snapshot.seq > record.seq):
            return snapshot
        return record

    def load_all(self) -> tuple[list[ContainerRecord], list[str]]:
        """Every readable record, plus one message per record that could not be read."""
        records: list[ContainerRecord] = []
        problems: list[str] = []
        try:
            names = sorted(os.listdir(self._paths.containers_dir))
        except FileNotFoundError:
            return records, problems
        for name in names:
            if name.startswith("."):
                continue
            try:
                record = self.load(name)
            except RecordError as exc:
                problems.append(str(exc))
                continue
            if record is not None:
                records.append(record)
        return records, problems

    def delete(self, container_id: str) -> None:
        # The snapshot first: it never outlives its durable record.
        for path in (self._snapshot(container_id), self._paths.record(container_id)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def retire(self, container_id: str) -> Path | None:
        """The first step of removing a container's directory: one rename takes it,
        record and all, out of the listing, so that a crash while its files are being
        removed leaves no directory without a record (which no one would remove). The
        caller removes the returned directory; `abandoned` finds it if it cannot."""
        retired = self._paths.containers_dir / f"{RETIRED_PREFIX}{container_id}"
        try:
            os.rename(self._paths.container_dir(container_id), retired)
        except FileNotFoundError:
            return None
        return retired

    def abandoned(self) -> list[tuple[str, Path]]:
        """(id, directory) of what a crash left: a removal that did not finish, and a
        directory whose first record was never written (a `run` killed in its first
        save, before anything else of the container was made)."""
        found: list[tuple[str, Path]] = []
        try:
            names = sorted(os.listdir(self._paths.containers_dir))
        except FileNotFoundError:
            return found
        for name in names:
            path = self._paths.containers_dir / name
            if name.startswith(RETIRED_PREFIX):
                found.append((name.removeprefix(RETIRED_PREFIX), path))
            elif not name.startswith(".") and path.is_dir() and not self._has_record(name):
                found.append((name, path))
        return found

    def _has_record(self, container_id: str) -> bool:
        """A record file, readable or not (load_all reads it, and reports it if not)."""
        return any(
            p.exists() for p in (self._paths.record(container_id), self._snapshot(container_id))
        )


def _read(path: Path) -> ContainerRecord | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        record = msgspec.json.decode(data, type=ContainerRecord)
    except msgspec.DecodeError as exc:
        raise RecordError(f"corrupt record {path}: {exc}") from exc
    if record.version != RECORD_VERSION:
        raise RecordError(f"record {path} has unknown version {record.version}")
    return record
