"""The `delete` action: clean up after a shim containerd can no longer reach.

Runs once per container (after every task delete, and for dead shims), may
find its bundle gone or emptied, and may run twice: every step tolerates that.
stdout carries only the raw DeleteResponse; anything worth saying goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time

from shim import _wire

TYPE_CHECKING = False  # typing costs ~3 ms at start-up; mypy honours this name


if TYPE_CHECKING:
    from shim.cli import Options

DEFAULT_RUNC_ROOT = "/run/containerd/runc"
UNKNOWN_EXIT_STATUS = 137  # what containerd reports for a task whose shim died


def _warn(message: str) -> None:
    sys.stderr.write(f"{message}\n")


def _bundle_path(opts: Options) -> str:
    if opts.bundle:
        return opts.bundle
    try:
        return os.path.join(os.path.dirname(os.getcwd()), opts.id)
    except FileNotFoundError:  # cwd (the bundle) already removed
        return ""


def _read_runc_settings(bundle: str) -> tuple[str, str]:
    """(binary, root) from options.json, falling back to the `runtime` file."""
    binary, root = "", ""
    if bundle:
        try:
            with open(os.path.join(bundle, "options.json"), "rb") as f:
                options = json.load(f)
            if isinstance(options, dict):
                binary = str(options.get("binary_name") or "")
                root = str(options.get("root") or "")
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            _warn(f"failed to read options.json: {exc}")
        if not binary:
            try:
                with open(os.path.join(bundle, "runtime")) as f:
                    binary = f.read().strip()
            except OSError:
                pass
    return binary or "runc", root or DEFAULT_RUNC_ROOT


def runc_delete(bundle: str, namespace: str, container_id: str) -> None:
    binary, root = _read_runc_settings(bundle)
    argv = [binary, "--root", os.path.join(root, namespace)]
    # runc refuses to run when it cannot open its --log file.
    if bundle and os.path.isdir(bundle):
        argv += ["--log", os.path.join(bundle, "log.json"), "--log-format", "json"]
    argv += ["delete", "--force", container_id]
    # runc's output belongs on our stderr ("cleanup warnings"); stdout is the response.
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, 2, 1),
    ]
    try:
        pid = os.posix_spawnp(binary, argv, os.environ, file_actions=actions)
        _, status = os.waitpid(pid, 0)
    except OSError as exc:
        _warn(f"failed to run {binary} delete: {exc}")
        return
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        _warn(f"failed to remove runc container: {binary} exited with status {code}")


def _unmount_rootfs(bundle: str) -> None:
    rootfs = os.path.join(bundle, "rootfs")
    if not bundle or not os.path.isdir(rootfs):
        return
    try:
        from shim.mount import unmount_all

        unmount_all(rootfs)
    except Exception as exc:  # best effort: containerd unmounts the bundle again
        _warn(f"failed to cleanup rootfs mount: {exc}")


def remove_dead_socket(bundle: str) -> None:
    """Unlink the shim socket named in ``<bundle>/address`` when nobody listens on it.

    A shim that was SIGKILLed leaves its socket file behind (the Go shim's too). One
    that still answers (grouped with other containers, or merely stopped: the kernel
    still queues connections) keeps it.
    """
    if not bundle:
        return
    try:
        with open(os.path.join(bundle, "address")) as f:
            address = f.read().strip()
    except OSError:
        return
    if not address.startswith("unix://"):
        return  # abstract sockets vanish with their owner
    path = address[len("unix://") :]
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
            return
        except ConnectionRefusedError:
            pass
        except OSError:
            return  # missing, or not ours to judge
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        _warn(f"failed to remove dead shim socket {path}: {exc}")


def _init_pid(bundle: str) -> int:
    if not bundle:
        return 0
    try:
        with open(os.path.join(bundle, "init.pid")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def _recorded_exit(bundle: str, container_id: str) -> tuple[int, int, int] | None:
    """(pid, status, exited_at_ns) of the init as the shim persisted it, if it did."""
    if not bundle or not os.path.isdir(os.path.join(bundle, "pyshim")):
        return None
    try:
        from shim.state import ExitRecord, exit_record_path, read_record

        record = read_record(exit_record_path(bundle, container_id), ExitRecord)
    except Exception as exc:
        _warn(f"failed to read exit record: {exc}")
        return None
    if record is None:
        return None
    return record.pid, record.exit_status, record.exited_at_ns


def delete_response(pid: int, exit_status: int, exited_at_ns: int) -> bytes:
    """containerd.task.v2.DeleteResponse; exited_at is always present (1.6 expects it)."""
    seconds, nanos = divmod(exited_at_ns, 1_000_000_000)
    return (
        _wire.field_varint(1, pid)
        + _wire.field_varint(2, exit_status)
        + _wire.field_bytes(3, _wire.timestamp(seconds, nanos), always=True)
    )


def run_delete(opts: Options) -> int:
    bundle = _bundle_path(opts)
    runc_delete(bundle, opts.namespace, opts.id)
    _unmount_rootfs(bundle)
    remove_dead_socket(bundle)
    pid = _init_pid(bundle)
    recorded = _recorded_exit(bundle, opts.id)
    if recorded is not None:
        rec_pid, status, exited_at_ns = recorded
        pid = pid or rec_pid
    else:
        status, exited_at_ns = UNKNOWN_EXIT_STATUS, time.time_ns()
    sys.stdout.buffer.write(delete_response(pid, status, exited_at_ns))
    sys.stdout.flush()
    return 0
