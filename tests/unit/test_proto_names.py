"""Full names decide Any type URLs and ttrpc service strings: they must be exactly
what containerd registers (shared/spec/types.md, events.md, task-api.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from google.protobuf.message import Message

from protocol.proto import ttrpc_pb2
from protocol.proto.cgroups.v1 import metrics_pb2 as v1_metrics
from protocol.proto.cgroups.v2 import metrics_pb2 as v2_metrics
from protocol.proto.events import forward_pb2
from protocol.proto.events import task_pb2 as events_pb2
from protocol.proto.rpc import status_pb2
from protocol.proto.runc import options_pb2
from protocol.proto.runtimeoptions.v1 import api_pb2
from protocol.proto.task.v2 import shim_pb2 as v2
from protocol.proto.task.v3 import shim_pb2 as v3
from protocol.proto.types import mount_pb2
from protocol.proto.types import task_pb2 as types_task_pb2


@pytest.mark.parametrize(
    ("message", "name"),
    [
        (events_pb2.TaskCreate, "containerd.events.TaskCreate"),
        (events_pb2.TaskStart, "containerd.events.TaskStart"),
        (events_pb2.TaskExit, "containerd.events.TaskExit"),
        (events_pb2.TaskDelete, "containerd.events.TaskDelete"),
        (events_pb2.TaskExecAdded, "containerd.events.TaskExecAdded"),
        (events_pb2.TaskExecStarted, "containerd.events.TaskExecStarted"),
        (events_pb2.TaskPaused, "containerd.events.TaskPaused"),
        (events_pb2.TaskResumed, "containerd.events.TaskResumed"),
        (events_pb2.TaskOOM, "containerd.events.TaskOOM"),
        (events_pb2.TaskCheckpointed, "containerd.events.TaskCheckpointed"),
        (events_pb2.TaskIO, "containerd.events.TaskIO"),
        (forward_pb2.Envelope, "containerd.services.events.ttrpc.v1.Envelope"),
        (forward_pb2.ForwardRequest, "containerd.services.events.ttrpc.v1.ForwardRequest"),
        (options_pb2.Options, "containerd.runc.v1.Options"),
        (options_pb2.CheckpointOptions, "containerd.runc.v1.CheckpointOptions"),
        (options_pb2.ProcessDetails, "containerd.runc.v1.ProcessDetails"),
        (api_pb2.Options, "runtimeoptions.v1.Options"),
        (v1_metrics.Metrics, "io.containerd.cgroups.v1.Metrics"),
        (v2_metrics.Metrics, "io.containerd.cgroups.v2.Metrics"),
        (mount_pb2.Mount, "containerd.types.Mount"),
        (types_task_pb2.ProcessInfo, "containerd.v1.types.ProcessInfo"),
        (v2.CreateTaskRequest, "containerd.task.v2.CreateTaskRequest"),
        (ttrpc_pb2.Request, "ttrpc.Request"),
        (status_pb2.Status, "google.rpc.Status"),
    ],
)
def test_full_names(message: type[Message], name: str) -> None:
    assert message.DESCRIPTOR.full_name == name


TASK_METHODS = [
    ("State", "StateRequest", "StateResponse"),
    ("Create", "CreateTaskRequest", "CreateTaskResponse"),
    ("Start", "StartRequest", "StartResponse"),
    ("Delete", "DeleteRequest", "DeleteResponse"),
    ("Pids", "PidsRequest", "PidsResponse"),
    ("Pause", "PauseRequest", "Empty"),
    ("Resume", "ResumeRequest", "Empty"),
    ("Checkpoint", "CheckpointTaskRequest", "Empty"),
    ("Kill", "KillRequest", "Empty"),
    ("Exec", "ExecProcessRequest", "Empty"),
    ("ResizePty", "ResizePtyRequest", "Empty"),
    ("CloseIO", "CloseIORequest", "Empty"),
    ("Update", "UpdateTaskRequest", "Empty"),
    ("Wait", "WaitRequest", "WaitResponse"),
    ("Stats", "StatsRequest", "StatsResponse"),
    ("Connect", "ConnectRequest", "ConnectResponse"),
    ("Shutdown", "ShutdownRequest", "Empty"),
]


@pytest.mark.parametrize(
    ("module", "service"), [(v2, "containerd.task.v2.Task"), (v3, "containerd.task.v3.Task")]
)
def test_task_service_methods(module: object, service: str) -> None:
    desc = module.DESCRIPTOR.services_by_name["Task"]  # type: ignore[attr-defined]
    assert desc.full_name == service
    got = [(m.name, m.input_type.name, m.output_type.name) for m in desc.methods]
    assert got == TASK_METHODS
    # v3 reuses the v2 messages: the same classes travel under both services.
    for m in desc.methods:
        if m.output_type.name != "Empty":
            assert m.output_type.full_name.startswith("containerd.task.v2.")


def test_events_service() -> None:
    svc = forward_pb2.DESCRIPTOR.services_by_name["Events"]
    assert svc.full_name == "containerd.services.events.ttrpc.v1.Events"
    (method,) = svc.methods
    assert (method.name, method.input_type.full_name, method.output_type.full_name) == (
        "Forward",
        "containerd.services.events.ttrpc.v1.ForwardRequest",
        "google.protobuf.Empty",
    )


@pytest.mark.parametrize(
    ("message", "fields"),
    [
        (
            v2.StateResponse,
            {
                "id": 1,
                "bundle": 2,
                "pid": 3,
                "status": 4,
                "stdin": 5,
                "stdout": 6,
                "stderr": 7,
                "terminal": 8,
                "exit_status": 9,
                "exited_at": 10,
                "exec_id": 11,
            },
        ),
        (
            v2.CreateTaskRequest,
            {
                "id": 1,
                "bundle": 2,
                "rootfs": 3,
                "terminal": 4,
                "stdin": 5,
                "stdout": 6,
                "stderr": 7,
                "checkpoint": 8,
                "parent_checkpoint": 9,
                "options": 10,
            },
        ),
        (
            v2.ExecProcessRequest,
            {"id": 1, "exec_id": 2, "terminal": 3, "stdin": 4, "stdout": 5, "stderr": 6, "spec": 7},
        ),
        (
            events_pb2.TaskExit,
            {"container_id": 1, "id": 2, "pid": 3, "exit_status": 4, "exited_at": 5},
        ),
        (
            events_pb2.TaskDelete,
            {"container_id": 1, "pid": 2, "exit_status": 3, "exited_at": 4, "id": 5},
        ),
        (
            v1_metrics.MemoryStat,
            {"cache": 1, "total_unevictable": 32, "usage": 33, "kernel_tcp": 36},
        ),
        (v2_metrics.Metrics, {"pids": 1, "cpu": 2, "memory": 4, "io": 6, "memory_events": 8}),
        (v2_metrics.MemoryStat, {"anon": 1, "usage": 32, "usage_limit": 33, "swap_limit": 35}),
        (
            options_pb2.Options,
            {"no_pivot_root": 1, "binary_name": 6, "root": 7, "systemd_cgroup": 9},
        ),
    ],
)
def test_field_numbers(message: type[Message], fields: dict[str, int]) -> None:
    by_name = message.DESCRIPTOR.fields_by_name
    assert {name: by_name[name].number for name in fields} == fields


def test_shim_startup_imports_stay_lean() -> None:
    code = (
        "import sys\n"
        "import protocol.proto.task.v2.shim_pb2, protocol.proto.events.forward_pb2\n"
        "import protocol.proto.events.task_pb2, protocol.proto.ttrpc_pb2\n"
        "print(sorted(m for m in sys.modules if 'cgroups' in m or 'grpc' in m))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
