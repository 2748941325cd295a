import datetime

from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ContainerConfig(_message.Message):
    __slots__ = ("name", "args", "env", "workdir", "user", "memory_bytes", "cpus", "image", "rootfs", "terminal", "stdin", "auto_remove", "tty_width", "tty_height")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    WORKDIR_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ROOTFS_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    AUTO_REMOVE_FIELD_NUMBER: _ClassVar[int]
    TTY_WIDTH_FIELD_NUMBER: _ClassVar[int]
    TTY_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    args: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.RepeatedScalarFieldContainer[str]
    workdir: str
    user: str
    memory_bytes: int
    cpus: float
    image: str
    rootfs: str
    terminal: bool
    stdin: bool
    auto_remove: bool
    tty_width: int
    tty_height: int
    def __init__(self, name: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., env: _Optional[_Iterable[str]] = ..., workdir: _Optional[str] = ..., user: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., cpus: _Optional[float] = ..., image: _Optional[str] = ..., rootfs: _Optional[str] = ..., terminal: _Optional[bool] = ..., stdin: _Optional[bool] = ..., auto_remove: _Optional[bool] = ..., tty_width: _Optional[int] = ..., tty_height: _Optional[int] = ...) -> None: ...

class Container(_message.Message):
    __slots__ = ("id", "name", "status", "pid", "exited", "exit_status", "exited_at", "created_at", "command", "image", "bundle", "shim_address", "log_path", "stdin_path", "terminal", "exit_reason", "auto_remove", "shim_pid")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    EXITED_FIELD_NUMBER: _ClassVar[int]
    EXIT_STATUS_FIELD_NUMBER: _ClassVar[int]
    EXITED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    SHIM_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LOG_PATH_FIELD_NUMBER: _ClassVar[int]
    STDIN_PATH_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    EXIT_REASON_FIELD_NUMBER: _ClassVar[int]
    AUTO_REMOVE_FIELD_NUMBER: _ClassVar[int]
    SHIM_PID_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    status: str
    pid: int
    exited: bool
    exit_status: int
    exited_at: _timestamp_pb2.Timestamp
    created_at: _timestamp_pb2.Timestamp
    command: _containers.RepeatedScalarFieldContainer[str]
    image: str
    bundle: str
    shim_address: str
    log_path: str
    stdin_path: str
    terminal: bool
    exit_reason: str
    auto_remove: bool
    shim_pid: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., status: _Optional[str] = ..., pid: _Optional[int] = ..., exited: _Optional[bool] = ..., exit_status: _Optional[int] = ..., exited_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., command: _Optional[_Iterable[str]] = ..., image: _Optional[str] = ..., bundle: _Optional[str] = ..., shim_address: _Optional[str] = ..., log_path: _Optional[str] = ..., stdin_path: _Optional[str] = ..., terminal: _Optional[bool] = ..., exit_reason: _Optional[str] = ..., auto_remove: _Optional[bool] = ..., shim_pid: _Optional[int] = ...) -> None: ...

class RunRequest(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: ContainerConfig
    def __init__(self, config: _Optional[_Union[ContainerConfig, _Mapping]] = ...) -> None: ...

class RunResponse(_message.Message):
    __slots__ = ("container",)
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    container: Container
    def __init__(self, container: _Optional[_Union[Container, _Mapping]] = ...) -> None: ...

class ExecRequest(_message.Message):
    __slots__ = ("container", "args", "env", "workdir", "user", "terminal", "stdin", "tty_width", "tty_height")
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    WORKDIR_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    TTY_WIDTH_FIELD_NUMBER: _ClassVar[int]
    TTY_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    container: str
    args: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.RepeatedScalarFieldContainer[str]
    workdir: str
    user: str
    terminal: bool
    stdin: bool
    tty_width: int
    tty_height: int
    def __init__(self, container: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ..., env: _Optional[_Iterable[str]] = ..., workdir: _Optional[str] = ..., user: _Optional[str] = ..., terminal: _Optional[bool] = ..., stdin: _Optional[bool] = ..., tty_width: _Optional[int] = ..., tty_height: _Optional[int] = ...) -> None: ...

class ExecResponse(_message.Message):
    __slots__ = ("container_id", "exec_id", "pid", "log_path", "stdin_path")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    LOG_PATH_FIELD_NUMBER: _ClassVar[int]
    STDIN_PATH_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    exec_id: str
    pid: int
    log_path: str
    stdin_path: str
    def __init__(self, container_id: _Optional[str] = ..., exec_id: _Optional[str] = ..., pid: _Optional[int] = ..., log_path: _Optional[str] = ..., stdin_path: _Optional[str] = ...) -> None: ...

class KillRequest(_message.Message):
    __slots__ = ("container", "exec_id", "signal", "all")
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    container: str
    exec_id: str
    signal: int
    all: bool
    def __init__(self, container: _Optional[str] = ..., exec_id: _Optional[str] = ..., signal: _Optional[int] = ..., all: _Optional[bool] = ...) -> None: ...

class WaitRequest(_message.Message):
    __slots__ = ("container", "exec_id")
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    container: str
    exec_id: str
    def __init__(self, container: _Optional[str] = ..., exec_id: _Optional[str] = ...) -> None: ...

class WaitResponse(_message.Message):
    __slots__ = ("exit_status", "exited_at", "exit_reason")
    EXIT_STATUS_FIELD_NUMBER: _ClassVar[int]
    EXITED_AT_FIELD_NUMBER: _ClassVar[int]
    EXIT_REASON_FIELD_NUMBER: _ClassVar[int]
    exit_status: int
    exited_at: _timestamp_pb2.Timestamp
    exit_reason: str
    def __init__(self, exit_status: _Optional[int] = ..., exited_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., exit_reason: _Optional[str] = ...) -> None: ...

class RemoveRequest(_message.Message):
    __slots__ = ("container", "force")
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    container: str
    force: bool
    def __init__(self, container: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("all",)
    ALL_FIELD_NUMBER: _ClassVar[int]
    all: bool
    def __init__(self, all: _Optional[bool] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("containers",)
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    containers: _containers.RepeatedCompositeFieldContainer[Container]
    def __init__(self, containers: _Optional[_Iterable[_Union[Container, _Mapping]]] = ...) -> None: ...

class InspectRequest(_message.Message):
    __slots__ = ("container",)
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    container: str
    def __init__(self, container: _Optional[str] = ...) -> None: ...

class InspectResponse(_message.Message):
    __slots__ = ("container", "spec_json")
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    container: Container
    spec_json: str
    def __init__(self, container: _Optional[_Union[Container, _Mapping]] = ..., spec_json: _Optional[str] = ...) -> None: ...

class ResizeRequest(_message.Message):
    __slots__ = ("container", "exec_id", "width", "height")
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    container: str
    exec_id: str
    width: int
    height: int
    def __init__(self, container: _Optional[str] = ..., exec_id: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class CloseIORequest(_message.Message):
    __slots__ = ("container", "exec_id")
    CONTAINER_FIELD_NUMBER: _ClassVar[int]
    EXEC_ID_FIELD_NUMBER: _ClassVar[int]
    container: str
    exec_id: str
    def __init__(self, container: _Optional[str] = ..., exec_id: _Optional[str] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("ref", "digest", "layers", "size", "config_json")
    REF_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    ref: str
    digest: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    size: int
    config_json: str
    def __init__(self, ref: _Optional[str] = ..., digest: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., size: _Optional[int] = ..., config_json: _Optional[str] = ...) -> None: ...

class ImageImportRequest(_message.Message):
    __slots__ = ("archive_path", "ref")
    ARCHIVE_PATH_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    archive_path: str
    ref: str
    def __init__(self, archive_path: _Optional[str] = ..., ref: _Optional[str] = ...) -> None: ...

class ImageImportResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class ImageListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ImageListResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class ImageRemoveRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...
