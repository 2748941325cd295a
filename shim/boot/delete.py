"""The `delete` action: clean up after a shim containerd can no longer reach.

Runs once per container (after every task delete, and for dead shims), may
find its bundle gone or emptied, and may run twice: every step tolerates that.
stdout carries only the raw DeleteResponse; anything worth saying goes to stderr.
"""

from __future__ import annotations

import os
import sys
import time

from protocol import wire
from shim.boot import minijson as json
from shim.records.recordfile import read_regular_file
from shim.records.recordlog import log_path, read_live
from shim.records.statedir import EXIT_LOG, EXIT_RECORD_VERSION, LEGACY_EXITS_DIR, STATE_DIR_NAME
from shim.sys.procfs import gone

TYPE_CHECKING = False  # typing costs ~3 ms at start-up; mypy honours this name


if TYPE_CHECKING:
    from shim.boot.flags import Options

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


def _runc_creates(runc_root: str, container_id: str, proc: str = "/proc") -> list[int]:
    """Pids of `runc --root <runc_root> ... create ... <id>` processes still running.

    Matched on what runc keys its state on (root and id), however runc was started
    (directly, or through a wrapper script whose argv carries the same arguments).
    """
    found: list[int] = []
    try:
        entries = os.listdir(proc)
    except OSError:
        return found
    me = os.getpid()
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"{proc}/{entry}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        argv = raw.split(b"\0")[:-1]
        if len(argv) < 4 or argv[-1].decode(errors="replace") != container_id:
            continue
        if b"create" not in argv or b"--root" not in argv:
            continue
        i = argv.index(b"--root")
        if i + 1 < len(argv) and argv[i + 1].decode(errors="replace") == runc_root:
            found.append(int(entry))
    return found


def kill_runc_creates(runc_root: str, container_id: str, timeout: float = 2.0) -> None:
    """SIGKILL a `runc create` of this container that outlived its shim, and wait.

    The shim spawns runc with PDEATHSIG, yet a SIGKILLed shim's `runc create` was
    seen still running after containerd had started this `delete`: creating the
    state directory after the check below found none, and leaving it (empty).
    Nothing else may run `runc create` for this id while containerd deletes it.
    """
    pids = _runc_creates(runc_root, container_id)
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if not gone(p)]
        if pids:
            time.sleep(0.01)
    if pids:
        _warn(f"runc create {pids} of {container_id} still running")


def _remove_stateless_dir(state_dir: str) -> None:
    """Remove a runc state dir without state.json (runc knows no such container)."""
    try:
        entries = os.listdir(state_dir)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        _warn(f"failed to read runc state dir {state_dir}: {exc}")
        return
    if "state.json" in entries:
        return  # a container runc knows: only runc may remove it
    try:
        for name in entries:
            os.unlink(os.path.join(state_dir, name))  # exec.fifo: runc makes no subdirs
        os.rmdir(state_dir)
    except FileNotFoundError:
        pass
    except OSError as exc:
        _warn(f"failed to remove runc state dir {state_dir}: {exc}")


def runc_delete(bundle: str, namespace: str, container_id: str) -> None:
    binary, root = _read_runc_settings(bundle)
    state_dir = os.path.join(root, namespace, container_id)
    if not bundle or not os.path.exists(os.path.join(bundle, "init.pid")):
        # runc writes init.pid after state.json, as create's last step: without it a
        # `runc create` of ours may still be running and about to make state_dir.
        # It must be gone before state_dir is looked at.
        kill_runc_creates(os.path.join(root, namespace), container_id)
    try:
        os.lstat(state_dir)
    except FileNotFoundError:
        # What `runc delete --force` does then: RemoveAll of that missing directory,
        # exit 0. The usual case: the shim's Delete already ran runc delete.
        return
    except OSError:
        pass
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
    # `runc delete --force` removes a state dir without state.json itself; one that
    # is still there (a runc that refused, or failed) and that runc cannot know goes.
    _remove_stateless_dir(state_dir)


def _mountinfo_unescape(field: str) -> str:
    # The kernel escapes space, tab, newline and backslash as \ooo.
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def is_mount_point(path: str, mountinfo: str = "/proc/self/mountinfo") -> bool | None:
    """Whether ``path`` is a mount point in our mount namespace; None when unknown."""
    target = os.path.realpath(path)
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split(" ", 5)
                if len(fields) > 4 and _mountinfo_unescape(fields[4]) == target:
                    return True
    except OSError:
        return None
    return False


def _unmount_rootfs(bundle: str) -> None:
    rootfs = os.path.join(bundle, "rootfs")
    if not bundle or not os.path.isdir(rootfs):
        return
    if is_mount_point(rootfs) is False:
        # Nothing to unmount (the shim's Delete did it): spare the import of
        # shim.task.mount (ctypes, ~8 ms).
        return
    try:
        from shim.task.mount import unmount_all

        unmount_all(rootfs)
    except Exception as exc:  # best effort: containerd unmounts the bundle again
        _warn(f"failed to cleanup rootfs mount: {exc}")


CGROUP_ROOT = "/sys/fs/cgroup"


def _cgroups_path(bundle: str) -> str:
    """linux.cgroupsPath of the bundle's config.json, if it is a cgroupfs path."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec = json.load(f)
        path = str(spec.get("linux", {}).get("cgroupsPath") or "")
    except (OSError, ValueError, AttributeError):
        return ""
    # systemd's "slice:prefix:name" is systemd's to clean up.
    if not path.startswith("/") or ":" in path:
        return ""
    return path


def _cgroup_dirs(root: str, path: str) -> list[str]:
    rel = os.path.normpath(path).lstrip("/")
    if not rel or rel.startswith(".."):
        return []
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        candidates = [os.path.join(root, rel)]  # unified hierarchy
    else:
        try:
            hierarchies = sorted(
                e.path for e in os.scandir(root) if e.is_dir(follow_symlinks=False)
            )
        except OSError:
            return []
        candidates = [os.path.join(h, rel) for h in hierarchies]
    return [c for c in candidates if os.path.isdir(c)]


def remove_cgroup(bundle: str, root: str = CGROUP_ROOT) -> None:
    """Kill whatever is still in the container's cgroup and remove it.

    `runc delete --force` knows nothing of a container whose `runc create` died half
    way (its shim was SIGKILLed and took runc with it): the cgroups runc had already
    made stay behind, in some hierarchies only, possibly with a `runc init` in them.
    """
    if not bundle:
        return
    path = _cgroups_path(bundle)
    if not path:
        return
    for cg in _cgroup_dirs(root, path):
        for _ in range(20):
            try:
                with open(os.path.join(cg, "cgroup.procs")) as f:
                    pids = [int(p) for p in f.read().split()]
            except (OSError, ValueError):
                pids = []
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    continue
            time.sleep(0.05)
        # Children first; a cgroup directory is removed with rmdir, never its files.
        for dirpath, _dirs, _files in sorted(os.walk(cg), key=lambda w: -len(w[0])):
            try:
                os.rmdir(dirpath)
            except FileNotFoundError:
                pass
            except OSError as exc:
                _warn(f"failed to remove cgroup {dirpath}: {exc}")


def remove_dead_socket(bundle: str) -> bool:
    """Unlink the shim socket named in ``<bundle>/address`` when nobody listens on it;
    whether there was an address file.

    A shim that was SIGKILLed leaves its socket file behind (the Go shim's too). One
    that still answers (grouped with other containers, or merely stopped: the kernel
    still queues connections) keeps it.
    """
    if not bundle:
        return False
    try:
        with open(os.path.join(bundle, "address")) as f:
            address = f.read().strip()
    except OSError:
        return False
    _remove_if_dead(address)
    return True


def _remove_if_dead(address: str) -> None:
    if not address.startswith("unix://"):
        return  # abstract sockets vanish with their owner
    path = address[len("unix://") :]
    if not os.path.lexists(path):
        return  # removed by the shim at shutdown; spares importing shim.boot.start
    from shim.boot.start import remove_if_dead

    try:
        remove_if_dead(path)
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
    if not bundle or not os.path.isdir(os.path.join(bundle, STATE_DIR_NAME)):
        return None
    try:
        return read_init_exit(bundle, container_id)
    except Exception as exc:
        _warn(f"failed to read exit record: {exc}")
        return None


def read_init_exit(bundle: str, container_id: str) -> tuple[int, int, int] | None:
    """(pid, exit_status, exited_at_ns) of the init's record in shim.records.state.ExitLog, or
    in the file a shim from before the log left; None when there is none.

    Reads what ExitLog.load would, with its refusals: no symlink, no non-regular file,
    only the version it knows, typed fields.
    """
    path = log_path(bundle, EXIT_LOG)
    found: tuple[object, str] | None = None
    for seq, payload in read_live(path):
        try:
            record = json.loads(payload)
        except ValueError:
            continue  # whose it is cannot be told: not the init's for ExitLog either
        if (
            isinstance(record, dict)
            and record.get("container_id") == container_id
            and record.get("exec_id", "") == ""
        ):
            found = record, f"{path} #{seq}"  # the last one counts, as in ExitLog.load
    if found is not None:
        return exit_fields(*found)
    legacy = os.path.join(bundle, STATE_DIR_NAME, LEGACY_EXITS_DIR, f"{container_id}.json")
    data = read_regular_file(legacy)
    if data is None:
        return None
    try:
        record = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"corrupt record {legacy}: {exc}") from None
    return exit_fields(record, legacy)


def exit_fields(record: object, origin: str) -> tuple[int, int, int]:
    """(pid, exit_status, exited_at_ns) of a decoded ExitRecord; ValueError if unusable."""
    if not isinstance(record, dict) or "version" not in record:
        raise ValueError(f"corrupt record {origin}: no version")
    if record["version"] != EXIT_RECORD_VERSION:
        raise ValueError(
            f"record {origin} has version {record['version']}; "
            f"this shim reads version {EXIT_RECORD_VERSION}"
        )
    fields = (record.get("pid"), record.get("exit_status"), record.get("exited_at_ns"))
    names = (record.get("container_id"), record.get("exec_id"))
    if not all(type(v) is int for v in fields) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"corrupt record {origin}")
    pid, status, exited_at_ns = fields
    assert isinstance(pid, int) and isinstance(status, int) and isinstance(exited_at_ns, int)
    return pid, status, exited_at_ns


def delete_response(pid: int, exit_status: int, exited_at_ns: int) -> bytes:
    """containerd.task.v2.DeleteResponse; exited_at is always present (1.6 expects it)."""
    seconds, nanos = divmod(exited_at_ns, 1_000_000_000)
    return (
        wire.field_varint(1, pid)
        + wire.field_varint(2, exit_status)
        + wire.field_bytes(3, wire.timestamp(seconds, nanos), always=True)
    )


def run_delete(opts: Options) -> int:
    bundle = _bundle_path(opts)
    runc_delete(bundle, opts.namespace, opts.id)
    _unmount_rootfs(bundle)
    remove_cgroup(bundle)
    if not remove_dead_socket(bundle) and opts.address:
        # A `start` killed before it wrote `address` leaves the socket it bound;
        # ungrouped, its name follows from our flags. (shim.boot.start costs ~1 ms to
        # import: only here.)
        from shim.boot.start import socket_address

        _remove_if_dead(socket_address(opts.address, opts.namespace, opts.id))
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
