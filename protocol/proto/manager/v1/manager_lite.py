"""manager.proto's messages as LiteMessages (protocol.proto.lite), for the CLI: same
names, fields and bytes as manager_pb2's (and `--json` the same as MessageToDict's),
without importing protobuf. tests/unit/test_proto_lite.py holds them to manager.proto.
"""

from __future__ import annotations

from protocol.proto.lite import Empty, LiteMessage, Timestamp, int64, number, uint64

__all__ = [
    "CheckpointRequest",
    "CloseIORequest",
    "Container",
    "ContainerConfig",
    "ContainerStats",
    "Empty",
    "ExecRequest",
    "ExecResponse",
    "Image",
    "ImageImportRequest",
    "ImageImportResponse",
    "ImageListRequest",
    "ImageListResponse",
    "ImageRemoveRequest",
    "InspectRequest",
    "InspectResponse",
    "KillRequest",
    "LayerProgress",
    "ListRequest",
    "ListResponse",
    "LoginRequest",
    "MountRequest",
    "PauseRequest",
    "PortMapping",
    "PullProgressRequest",
    "PullProgressResponse",
    "PullRequest",
    "PullResponse",
    "RemoveRequest",
    "ResizeRequest",
    "RunRequest",
    "RunResponse",
    "StartRequest",
    "StartResponse",
    "StatsRequest",
    "StatsResponse",
    "StopRequest",
    "Timestamp",
    "TopProcess",
    "TopRequest",
    "TopResponse",
    "Volume",
    "VolumeCreateRequest",
    "VolumeListRequest",
    "VolumeListResponse",
    "VolumeRemoveRequest",
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
    memory_bytes: int64 = number(6)
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


class ExecRequest(LiteMessage):
    container: str = number(1)
    args: list[str] = number(2)
    env: list[str] = number(3)
    workdir: str = number(4)
    user: str = number(5)
    terminal: bool = number(6)
    stdin: bool = number(7)
    tty_width: int = number(8)
    tty_height: int = number(9)


class ExecResponse(LiteMessage):
    container_id: str = number(1)
    exec_id: str = number(2)
    pid: int = number(3)
    log_path: str = number(4)
    stdin_path: str = number(5)


class ListRequest(LiteMessage):
    all: bool = number(1)


class ListResponse(LiteMessage):
    containers: list[Container] = number(1)


class InspectRequest(LiteMessage):
    container: str = number(1)


class InspectResponse(LiteMessage):
    container: Container = number(1)
    spec_json: str = number(2)


class ResizeRequest(LiteMessage):
    container: str = number(1)
    exec_id: str = number(2)
    width: int = number(3)
    height: int = number(4)


class CloseIORequest(LiteMessage):
    container: str = number(1)
    exec_id: str = number(2)


class Image(LiteMessage):
    ref: str = number(1)
    digest: str = number(2)
    layers: list[str] = number(3)
    size: int64 = number(4)
    config_json: str = number(5)


class ImageImportRequest(LiteMessage):
    archive_path: str = number(1)
    ref: str = number(2)


class ImageImportResponse(LiteMessage):
    images: list[Image] = number(1)


class ImageListRequest(LiteMessage):
    pass


class ImageListResponse(LiteMessage):
    images: list[Image] = number(1)


class ImageRemoveRequest(LiteMessage):
    ref: str = number(1)


class StopRequest(LiteMessage):
    container: str = number(1)
    timeout_seconds: int = number(2)


class StartRequest(LiteMessage):
    container: str = number(1)
    checkpoint: str = number(2)


class CheckpointRequest(LiteMessage):
    container: str = number(1)
    output: str = number(2)
    leave_running: bool = number(3)


class StartResponse(LiteMessage):
    container: Container = number(1)


class PauseRequest(LiteMessage):
    container: str = number(1)


class StatsRequest(LiteMessage):
    containers: list[str] = number(1)


class ContainerStats(LiteMessage):
    id: str = number(1)
    name: str = number(2)
    cpu_usage_ns: uint64 = number(3)
    memory_usage: uint64 = number(4)
    memory_limit: uint64 = number(5)
    pids: uint64 = number(6)
    net_rx_bytes: uint64 = number(7)
    net_tx_bytes: uint64 = number(8)
    read_at: Timestamp = number(9)


class StatsResponse(LiteMessage):
    stats: list[ContainerStats] = number(1)


class TopRequest(LiteMessage):
    container: str = number(1)


class TopProcess(LiteMessage):
    pid: int = number(1)
    ppid: int = number(2)
    user: str = number(3)
    command: str = number(4)


class TopResponse(LiteMessage):
    processes: list[TopProcess] = number(1)


class Volume(LiteMessage):
    name: str = number(1)
    mountpoint: str = number(2)
    created_at: Timestamp = number(3)
    used_by: list[str] = number(4)


class VolumeCreateRequest(LiteMessage):
    name: str = number(1)


class VolumeListRequest(LiteMessage):
    pass


class VolumeListResponse(LiteMessage):
    volumes: list[Volume] = number(1)


class VolumeRemoveRequest(LiteMessage):
    name: str = number(1)
    force: bool = number(2)


class PullRequest(LiteMessage):
    ref: str = number(1)


class PullResponse(LiteMessage):
    image: Image = number(1)


class PullProgressRequest(LiteMessage):
    ref: str = number(1)


class LayerProgress(LiteMessage):
    digest: str = number(1)
    size: int64 = number(2)
    done: int64 = number(3)
    state: str = number(4)


class PullProgressResponse(LiteMessage):
    layers: list[LayerProgress] = number(1)
    active: bool = number(2)


class LoginRequest(LiteMessage):
    registry: str = number(1)
    username: str = number(2)
    password: str = number(3)
