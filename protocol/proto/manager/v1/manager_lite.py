"""manager.proto's messages that the CLI's quick commands send and read, as
LiteMessages (protocol.proto.lite): same names, fields and bytes as manager_pb2's,
without importing protobuf. tests/unit/test_proto_lite.py holds them to manager.proto.
"""

from __future__ import annotations

from protocol.proto.lite import Empty, LiteMessage, Timestamp, number

__all__ = [
    "Container",
    "ContainerConfig",
    "Empty",
    "KillRequest",
    "MountRequest",
    "PortMapping",
    "RemoveRequest",
    "RunRequest",
    "RunResponse",
    "Timestamp",
    "WaitRequest",
    "WaitResponse",
]


class PortMapping(LiteMessage):
    host_port: int = number(1)
    container_port: int = number(2)
    protocol: str = number(3)
    host_ip: str = number(4)


class MountRequest(LiteMessage):
    type: str = number(1)
    source: str = number(2)
    destination: str = number(3)
    readonly: bool = number(4)
    options: str = number(5)


class ContainerConfig(LiteMessage):
    name: str = number(1)
    args: list[str] = number(2)
    env: list[str] = number(3)
    workdir: str = number(4)
    user: str = number(5)
    memory_bytes: int = number(6)
    cpus: float = number(7)
    image: str = number(8)
    rootfs: str = number(9)
    terminal: bool = number(10)
    stdin: bool = number(11)
    auto_remove: bool = number(12)
    tty_width: int = number(13)
    tty_height: int = number(14)
    restart_policy: str = number(15)
    restart_max: int = number(16)
    network: str = number(17)
    ports: list[PortMapping] = number(18)
    mounts: list[MountRequest] = number(19)
    stop_signal: str = number(20)


class Container(LiteMessage):
    id: str = number(1)
    name: str = number(2)
    status: str = number(3)
    pid: int = number(4)
    exited: bool = number(5)
    exit_status: int = number(6)
    exited_at: Timestamp = number(7)
    created_at: Timestamp = number(8)
    command: list[str] = number(9)
    image: str = number(10)
    bundle: str = number(11)
    shim_address: str = number(12)
    log_path: str = number(13)
    stdin_path: str = number(14)
    terminal: bool = number(15)
    exit_reason: str = number(16)
    auto_remove: bool = number(17)
    shim_pid: int = number(18)
    restart_policy: str = number(19)
    restart_count: int = number(20)
    oom_killed: bool = number(21)
    started_at: Timestamp = number(22)
    network: str = number(23)
    ip_address: str = number(24)
    ports: list[PortMapping] = number(25)
    mounts: list[MountRequest] = number(26)


class RunRequest(LiteMessage):
    config: ContainerConfig = number(1)


class RunResponse(LiteMessage):
    container: Container = number(1)


class KillRequest(LiteMessage):
    container: str = number(1)
    exec_id: str = number(2)
    signal: int = number(3)
    all: bool = number(4)


class WaitRequest(LiteMessage):
    container: str = number(1)
    exec_id: str = number(2)


class WaitResponse(LiteMessage):
    exit_status: int = number(1)
    exited_at: Timestamp = number(2)
    exit_reason: str = number(3)


class RemoveRequest(LiteMessage):
    container: str = number(1)
    force: bool = number(2)
