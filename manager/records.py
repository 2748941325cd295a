"""Durable per-container records: msgspec JSON, written atomically (tmp + fsync + rename)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import msgspec

from manager.paths import Paths

RECORD_VERSION = 1


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


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class RecordStore:
    def __init__(self, paths: Paths) -> None:
        self._paths = paths

    def save(self, record: ContainerRecord) -> None:
        write_atomic(self._paths.record(record.id), msgspec.json.encode(record))

    def load(self, container_id: str) -> ContainerRecord | None:
        path = self._paths.record(container_id)
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
        with contextlib.suppress(FileNotFoundError):
            self._paths.record(container_id).unlink()
