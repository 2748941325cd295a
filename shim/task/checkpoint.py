"""Checkpoint and restore through runc and CRIU: the requests, their runc flags, errors.

What containerd's Go shim (2.3) does, looked up in its process/init.go and go-runc:

- Checkpoint: ``runc checkpoint --image-path <path> --work-path <work> [--parent-path P]
  [--tcp-established] [--ext-unix-sk] [--shell-job] [--file-locks] [--empty-ns NS]...
  [--leave-running] <id>``; ``--leave-running`` unless ``exit``. ``work`` is the
  options' ``work_path``, else ``<bundle>/work/criu-work``, which is removed afterwards.
  ``cgroups_mode`` and ``image_path`` are not forwarded (the request's ``path`` is the
  image path; containerd reads ``image_path`` itself to choose it).
- A failed checkpoint copies CRIU's ``<work>/dump.log`` to ``<bundle>/criu-dump.log``
  (the work dir may be about to go) and answers with the first line of runc's error
  followed by `` path= <bundle>/criu-dump.log``.
- Restore happens at Start of a task created with ``checkpoint``: ``runc restore
  --image-path <checkpoint> --work-path <criu_work_path or <bundle>/work> [--parent-path
  <parent_checkpoint>] --detach --pid-file <bundle>/init.pid [--console-socket S]
  [--no-pivot] -no-subreaper --bundle <bundle> <id>``.

Unlike the Go shim, pyshim publishes ``/tasks/checkpointed`` after a checkpoint
(runtime v2's documentation says a shim should), and refuses a request without an
absolute image path instead of letting runc write into the bundle.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass

from google.protobuf import any_pb2

from protocol.proto import anyutil
from protocol.proto.runc import options_pb2
from protocol.proto.task.v2 import shim_pb2
from protocol.ttrpc.status import Code, TtrpcError

__all__ = [
    "CRIU_DUMP_LOG",
    "CheckpointConfig",
    "RestoreConfig",
    "checkpoint_args",
    "checkpoint_failure",
    "decode_checkpoint_request",
    "default_work_path",
    "remove_default_work",
    "restore_args",
    "validate_restore_paths",
]

log = logging.getLogger(__name__)

# Where a failed checkpoint's CRIU log is kept, in the bundle (the reference's name).
CRIU_DUMP_LOG = "criu-dump.log"


@dataclass(frozen=True)
class CheckpointConfig:
    """A CheckpointTaskRequest as runc needs it."""

    path: str
    exit: bool = False
    open_tcp: bool = False
    external_unix_sockets: bool = False
    terminal: bool = False
    file_locks: bool = False
    empty_namespaces: tuple[str, ...] = ()
    work_path: str = ""
    parent_path: str = ""


@dataclass(frozen=True)
class RestoreConfig:
    """What Create from a checkpoint keeps for Start, which runs the restore."""

    image_path: str
    work_path: str
    parent_path: str
    pid_file: str
    no_pivot: bool


def _invalid(message: str) -> TtrpcError:
    return TtrpcError(Code.INVALID_ARGUMENT, message)


def _check_path(what: str, path: str) -> None:
    if "\0" in path:
        raise _invalid(f"{what} {path!r}: contains a NUL byte")
    if not os.path.isabs(path):
        raise _invalid(f"{what} {path!r}: must be an absolute path")


def decode_checkpoint_request(req: shim_pb2.CheckpointTaskRequest) -> CheckpointConfig:
    _check_path("checkpoint: image path", req.path)
    opts = _checkpoint_options(req.options if req.HasField("options") else None)
    if opts.work_path:
        _check_path("checkpoint: work path", opts.work_path)
    if opts.parent_path:
        _check_path("checkpoint: parent path", opts.parent_path)
    if opts.cgroups_mode or opts.image_path:
        # Neither reaches runc from the Go shim either: see the module's docstring.
        log.info(
            "checkpoint of %s: cgroups_mode %r and image_path %r are not runc flags",
            req.id,
            opts.cgroups_mode,
            opts.image_path,
        )
    return CheckpointConfig(
        path=req.path,
        exit=opts.exit,
        open_tcp=opts.open_tcp,
        external_unix_sockets=opts.external_unix_sockets,
        terminal=opts.terminal,
        file_locks=opts.file_locks,
        empty_namespaces=tuple(opts.empty_namespaces),
        work_path=opts.work_path,
        parent_path=opts.parent_path,
    )


def _checkpoint_options(value: any_pb2.Any | None) -> options_pb2.CheckpointOptions:
    if value is None or not value.type_url:
        return options_pb2.CheckpointOptions()
    if not anyutil.is_type(value, options_pb2.CheckpointOptions):
        raise _invalid(
            f"checkpoint: options of type {value.type_url!r} are not "
            "containerd.runc.v1.CheckpointOptions"
        )
    try:
        return anyutil.unpack(value, options_pb2.CheckpointOptions)
    except anyutil.AnyTypeError as exc:
        raise _invalid(f"checkpoint: invalid options: {exc}") from exc


def default_work_path(bundle: str) -> str:
    return os.path.join(bundle, "work", "criu-work")


def checkpoint_args(config: CheckpointConfig, work_path: str) -> list[str]:
    """runc's ``checkpoint`` flags, in go-runc's order (the container id follows)."""
    args = ["--image-path", config.path, "--work-path", work_path]
    if config.parent_path:
        args += ["--parent-path", config.parent_path]
    if config.open_tcp:
        args.append("--tcp-established")
    if config.external_unix_sockets:
        args.append("--ext-unix-sk")
    if config.terminal:
        args.append("--shell-job")
    if config.file_locks:
        args.append("--file-locks")
    for ns in config.empty_namespaces:
        args += ["--empty-ns", ns]
    if not config.exit:
        args.append("--leave-running")
    return args


def restore_args(config: RestoreConfig, *, console_socket: str | None, bundle: str) -> list[str]:
    """runc's ``restore`` flags, in go-runc's order (the container id follows)."""
    args = ["--image-path", config.image_path, "--work-path", config.work_path]
    if config.parent_path:
        args += ["--parent-path", config.parent_path]
    args += ["--detach", "--pid-file", os.path.abspath(config.pid_file)]
    if console_socket:
        args += ["--console-socket", console_socket]
    if config.no_pivot:
        args.append("--no-pivot")
    # go-runc's spelling; runc's flag parser takes one dash as well as two.
    args += ["-no-subreaper", "--bundle", bundle]
    return args


def validate_restore_paths(checkpoint: str, parent: str) -> None:
    """Refuse, at Create, a checkpoint runc could only fail on at Start."""
    _check_path("checkpoint", checkpoint)
    if not os.path.isdir(checkpoint):
        raise _invalid(f"checkpoint {checkpoint}: not a directory")
    if parent:
        _check_path("parent checkpoint", parent)
        if not os.path.isdir(parent):
            raise _invalid(f"parent checkpoint {parent}: not a directory")


def checkpoint_failure(message: str, *, bundle: str, work_path: str) -> TtrpcError:
    """The error of a failed ``runc checkpoint``, with CRIU's log kept in the bundle."""
    kept = os.path.join(bundle, CRIU_DUMP_LOG)
    try:
        shutil.copyfile(os.path.join(work_path, "dump.log"), kept)
    except OSError as exc:
        # Still name the path, as the reference does: it says where to look first.
        log.error("cannot keep CRIU's dump.log as %s: %s", kept, exc)
    first_line = message.split("\n", 1)[0]
    return TtrpcError(Code.UNKNOWN, f"{first_line} path= {kept}")


def remove_default_work(work_path: str) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(work_path)
