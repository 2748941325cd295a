"""A private containerd (Debian's 1.6 from PATH, or a 2.x from a directory): its own
temp dir (root, state, sockets, config, log) and a unique namespace, started and
stopped by PID, everything it caused removed on close.

The crash tool runs one; the integration tests subclass it (tests/support/containerd.py)
for what only pyshim's tests need. containerd 1.6 shims share /run/containerd/s and
runc's default root /run/containerd/runc/<ns>, and only a unique namespace keeps
several instances apart.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from crashtest.procs import alive, flag

# The binaries a containerd 2.x directory must hold (directly or in bin/).
HOST_BINARIES = ("containerd", "ctr", "containerd-shim-runc-v2")
# Where containerd 1.6 has every shim put its socket (2.x names a socket_dir).
SOCKET_DIR = "/run/containerd/s"


@dataclass(frozen=True)
class Host:
    """A containerd to run: its name (the test id) and where its binaries are.

    ``bin_dir`` None means containerd and ctr from PATH (Debian's 1.6).
    """

    name: str
    bin_dir: Path | None = None

    @property
    def v2(self) -> bool:
        return not self.name.startswith("1.")

    @property
    def containerd(self) -> str:
        return str(self.bin_dir / "containerd") if self.bin_dir else "containerd"

    @property
    def ctr(self) -> str:
        return str(self.bin_dir / "ctr") if self.bin_dir else "ctr"

    @property
    def go_shim(self) -> str:
        """containerd-shim-runc-v2 of this containerd (PATH for Debian's)."""
        return str(self.bin_dir / HOST_BINARIES[2]) if self.bin_dir else HOST_BINARIES[2]


DEBIAN = Host("1.6")


def bin_dir_in(directory: Path) -> Path | None:
    """``directory`` or its bin/, whichever holds containerd, ctr and the runc shim."""
    for candidate in (directory, directory / "bin"):
        if all(os.access(candidate / b, os.X_OK) for b in HOST_BINARIES):
            return candidate
    return None


def binary_version(binary: Path) -> str:
    """``binary --version``'s output ("" when it does not run)."""
    try:
        return subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.strip()
    except OSError:
        return ""


def unpack_release(tarball: Path, cache: Path) -> Path:
    """The bin dir of a containerd release tarball (.tar.xz/.tar.gz), unpacked under
    ``cache`` once: a finished unpack is reused, two processes unpacking wait in turn."""
    stat = tarball.stat()
    name = tarball.name.removesuffix(".xz").removesuffix(".gz").removesuffix(".tar")
    dest = cache / f"{name}-{stat.st_size}-{int(stat.st_mtime)}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(str(dest) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = bin_dir_in(dest)
        if found is not None:
            return found
        partial = Path(str(dest) + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        try:
            with tarfile.open(tarball, "r:*") as tar:
                # Plain files and directories inside the destination only (Debian's
                # 3.11.2 predates extractall's filter=).
                members = [
                    m
                    for m in tar.getmembers()
                    if (m.isfile() or m.isdir())
                    and not m.name.startswith("/")
                    and ".." not in Path(m.name).parts
                ]
                tar.extractall(partial, members=members)
        except (OSError, tarfile.TarError) as exc:
            raise ContainerdError(f"{tarball}: cannot unpack: {exc}") from None
        partial.rename(dest)
    found = bin_dir_in(dest)
    if found is None:
        raise ContainerdError(f"{tarball} holds no {', '.join(HOST_BINARIES)}")
    return found


def shim_socket(address: str, namespace: str, cid: str, socket_dir: str = SOCKET_DIR) -> str:
    """The socket containerd's convention gives the shim of ``cid`` (what an ungrouped
    shim binds): sha256 of the slash-joined address/namespace/id under socket_dir."""
    joined = "/".join(p.strip("/") for p in (address, namespace, cid) if p.strip("/"))
    key = ("/" if address.startswith("/") else "") + joined
    return f"unix://{socket_dir}/{hashlib.sha256(key.encode()).hexdigest()}"


# Set in containerd's environment: the processes it caused carry it.
MARKER_ENV = "CRASHTEST_CONTAINERD"
CONTAINERD = "containerd"
CTR = "ctr"
RUNC_ROOT = Path("/run/containerd/runc")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# A bound on a start that never comes, not an expectation: containerd 2.3 under qemu
# TCG on a loaded 2-core host took over 30 s to answer its first `ctr version`.
START_TIMEOUT = 120.0
STOP_TIMEOUT = 15.0


class ContainerdError(RuntimeError):
    pass


def _venv_bin() -> str:
    # Not resolved: the venv's bin dir holds containerd-shim-pyshim-v1, the
    # interpreter it points to does not.
    return os.path.dirname(sys.executable)


# containerd 2.x splits CRI in three plugins; without CRI none of them is wanted.
CRI_PLUGINS_2 = ("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime",
                 "io.containerd.cri.v1.images")  # fmt: skip


def _config(tmp: Path, *, cri: bool, log_level: str, extra: str = "", host: Host = DEBIAN) -> str:
    """The config of a containerd of our own: every socket, dir and level in ``tmp``.

    containerd 2.x reads version 3, where the CRI plugin is two; NRI would share one
    socket with every other 2.x containerd on the host: off. Its shim sockets go to
    our temp dir (socket_dir, which 2.3 hands the shim in its BootstrapParams)."""
    cri_plugins = CRI_PLUGINS_2 if host.v2 else ["io.containerd.grpc.v1.cri"]
    disabled = "[]" if cri else "[" + ", ".join(f'"{p}"' for p in cri_plugins) + "]"
    v2_only = f"""
[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.shim.v1.manager"]
  socket_dir = "{tmp / "s"}"
"""
    return f"""version = {3 if host.v2 else 2}
root = "{tmp / "root"}"
state = "{tmp / "state"}"
disabled_plugins = {disabled}

[grpc]
  address = "{tmp / "containerd.sock"}"

[ttrpc]
  address = "{tmp / "containerd.sock.ttrpc"}"

[debug]
  address = "{tmp / "debug.sock"}"
  level = "{log_level}"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{tmp / "opt"}"
{v2_only if host.v2 else ""}{extra}"""


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return []


def _settled_cmdline(pid: int, timeout: float = 1.0) -> list[str]:
    """``_cmdline``, waiting out an execve in progress.

    posix_spawn (vfork) returns once the child's execve has passed its point of no
    return, before the kernel has set up the new argv: for a moment the child's
    cmdline reads empty although it has an executable. A shim `start` just spawned
    (the re-exec path) would be missed. Kernel threads and zombies have no exe.
    """
    deadline = time.monotonic() + timeout
    while True:
        argv = _cmdline(pid)
        if argv:
            return argv
        try:
            os.readlink(f"/proc/{pid}/exe")
        except OSError:
            return argv
        if time.monotonic() > deadline:
            return argv
        time.sleep(0.002)


def _environ_value(pid: int, name: str) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return None
    prefix = f"{name}=".encode()
    for entry in entries:
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode(errors="replace")
    return None


def processes_with_env(name: str, value: str) -> list[int]:
    """PIDs (other than ours) whose environment holds name=value."""
    want = f"{name}={value}".encode()
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if want in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:  # gone, or a kernel thread
            continue
    return found


def socket_accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
        return True


def _unix_path(address: str) -> str | None:
    if address.startswith("unix://"):
        return address[len("unix://") :]
    return None


class Containerd:
    """A containerd daemon started (and stopped, by PID) by this process."""

    # Seconds between readiness checks (_ready) while containerd starts.
    ready_poll_interval = 0.05
    # How long it may take to serve (a qemu TCG guest on a busy host needs longer).
    start_timeout = START_TIMEOUT

    def __init__(
        self,
        *,
        namespace: str | None = None,
        cri: bool = False,
        extra_config: Callable[[Path], str] | None = None,
        tmp: Path | None = None,
        log_level: str = "debug",
        start: bool = True,
        host: Host = DEBIAN,
    ) -> None:
        """``extra_config(tmp)`` returns TOML appended to the config (e.g. the CRI plugin's).

        ``tmp``: an empty directory to own instead of a new one under /tmp;
        ``start=False`` leaves starting to the caller; ``host``: which containerd.
        """
        self.host = host
        self.tmp = (
            tmp if tmp is not None else Path(tempfile.mkdtemp(prefix="pyshim-ctrd-", dir="/tmp"))
        )
        self.namespace = namespace or f"pyt-{secrets.token_hex(4)}"
        self.root = self.tmp / "root"
        self.state = self.tmp / "state"
        self.address = str(self.tmp / "containerd.sock")
        self.ttrpc_address = str(self.tmp / "containerd.sock.ttrpc")
        self.config_path = self.tmp / "config.toml"
        self.log_path = self.tmp / "containerd.log"
        for d in (self.root, self.state, self.tmp / "opt"):
            d.mkdir(mode=0o711)
        extra = extra_config(self.tmp) if extra_config is not None else ""
        # Where shim sockets go: containerd 2.3 tells the shim (socket_dir); 1.6 shims
        # use the host-wide default.
        self.socket_dir = str(self.tmp / "s") if host.v2 else SOCKET_DIR
        self.config_path.write_text(
            _config(self.tmp, cri=cri, log_level=log_level, extra=extra, host=host)
        )
        self.proc: subprocess.Popen[bytes] | None = None
        # Shim sockets live outside the temp dir (/run/containerd/s); remember
        # every one we learn of so close() can remove them.
        self._shim_sockets: set[str] = set()
        self._closed = False
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    # -- lifecycle ---------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        path = env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        if self.host.bin_dir is not None:
            # Its own containerd-shim-runc-v2 before Debian's (a 1.6 shim cannot read
            # 2.3's BootstrapParams), and its ctr for anything that runs `ctr`.
            path = str(self.host.bin_dir) + os.pathsep + path
        env["PATH"] = _venv_bin() + os.pathsep + path
        # Every process containerd starts inherits it: what close() sweeps up.
        env[MARKER_ENV] = str(self.tmp)
        # ctr 2.x warns on stderr about every deprecation (cgroup v1 here) at each call.
        env["CONTAINERD_SUPPRESS_DEPRECATION_WARNINGS"] = "1"
        return env

    def start(self) -> float:
        """Start containerd; returns the seconds until it was ready (see _ready)."""
        if self.proc is not None and self.proc.poll() is None:
            raise ContainerdError("containerd is already running")
        with open(self.log_path, "ab") as log:
            log.write(f"---- starting containerd at {time.time():.3f}\n".encode())
            log.flush()
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(
                [self.host.containerd, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env(),
                cwd=self.tmp,
                # Own session: a ^C to pytest must not hit containerd before
                # close() has had a chance to clean up through it.
                start_new_session=True,
            )
        self._wait_ready()
        return time.perf_counter() - t0

    def _ready(self) -> bool:
        """Both sockets exist, the gRPC one accepts, and ``ctr version`` answers (a slow
        answer is a not-yet: in a loaded qemu TCG guest one took over 10 s)."""
        if not (os.path.exists(self.address) and os.path.exists(self.ttrpc_address)):
            return False
        if not socket_accepts(self.address):
            return False
        try:
            return self.ctr("version", check=False, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ContainerdError(
                    f"containerd exited with {self.proc.returncode}\n{self.log_tail()}"
                )
            if self._ready():
                return
            time.sleep(self.ready_poll_interval)
        raise ContainerdError(
            f"containerd not ready after {self.start_timeout}s\n{self.log_tail()}"
        )

    def _stop(self, sig: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=STOP_TIMEOUT)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM containerd (SIGKILL after a grace period); shims stay alive."""
        self._stop(signal.SIGTERM)

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill9(self, *, start_again: bool = True) -> None:
        """SIGKILL containerd by PID, then (by default) start it on the same dirs."""
        self._stop(signal.SIGKILL)
        if start_again:
            self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- helpers for tests -------------------------------------------------

    def ctr_argv(self, *args: str, namespace: str | None = None) -> list[str]:
        return [self.host.ctr, "--address", self.address, "-n", namespace or self.namespace, *args]

    def ctr(
        self,
        *args: str,
        input: bytes | str | None = None,
        check: bool = True,
        timeout: float = 60.0,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = self.ctr_argv(*args, namespace=namespace)
        data = input.decode() if isinstance(input, bytes) else input
        res = subprocess.run(
            argv,
            input=data,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            stdin=None if data is not None else subprocess.DEVNULL,
        )
        if check and res.returncode != 0:
            raise ContainerdError(
                f"{' '.join(argv)} exited {res.returncode}\n"
                f"stdout: {res.stdout}\nstderr: {res.stderr}"
            )
        return res

    def bundle(self, container_id: str) -> Path:
        return self.state / "io.containerd.runtime.v2.task" / self.namespace / container_id

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def shim_pids(self) -> list[int]:
        """Processes started for this containerd: their -address is our socket."""
        pids = []
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            argv = _settled_cmdline(int(entry))
            # Every shim invocation (start, delete, daemon) carries -id and the
            # -address of the containerd it serves; our socket path is unique.
            if flag(argv, "id") is None:
                continue
            if flag(argv, "address") == self.address:
                pids.append(int(entry))
        return pids

    # -- cleanup -----------------------------------------------------------

    def _remember_shim_sockets(self) -> None:
        # Bundles under state/, bundles tests made elsewhere in tmp, and the cwd
        # (first bundle) of every live shim of ours.
        addr_files: list[Path] = []
        # containerd may be removing snapshot dirs while we walk the tree.
        with contextlib.suppress(OSError):
            addr_files.extend(self.tmp.rglob("address"))
        for pid in self.shim_pids():
            with contextlib.suppress(OSError):
                addr_files.append(Path(os.readlink(f"/proc/{pid}/cwd")) / "address")
        for addr_file in addr_files:
            with contextlib.suppress(OSError):
                path = _unix_path(addr_file.read_text().strip())
                if path:
                    self._shim_sockets.add(path)

    def _namespaces(self) -> list[str]:
        res = self.ctr("namespaces", "ls", "-q", check=False, timeout=20)
        names = set(res.stdout.split()) if res.returncode == 0 else set()
        names.add(self.namespace)
        return sorted(names)

    def _remove_all_through_containerd(self) -> None:
        for ns in self._namespaces():
            tasks = self.ctr("tasks", "ls", "-q", check=False, timeout=20, namespace=ns)
            for tid in tasks.stdout.split() if tasks.returncode == 0 else []:
                self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", tid, check=False,
                         timeout=20, namespace=ns)  # fmt: skip
                self.ctr("tasks", "delete", "-f", tid, check=False, timeout=30, namespace=ns)
            ctrs = self.ctr("containers", "ls", "-q", check=False, timeout=20, namespace=ns)
            for cid in ctrs.stdout.split() if ctrs.returncode == 0 else []:
                # A shim killed by the test leaves its socket and containerd has
                # removed the bundle naming it; ungrouped, the address is derivable.
                path = _unix_path(shim_socket(self.address, ns, cid, self.socket_dir))
                if path:
                    self._shim_sockets.add(path)
                self.ctr("containers", "rm", cid, check=False, timeout=30, namespace=ns)

    def _kill_shims(self) -> None:
        for pid in self.shim_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(alive(p) for p in self.shim_pids()):
            time.sleep(0.05)

    def _runc_leftovers(self) -> None:
        # The namespace is unique to this instance, so anything under its runc
        # root is ours (container inits orphaned by a killed shim).
        root = RUNC_ROOT / self.namespace
        if not root.is_dir():
            return
        for entry in root.iterdir():
            subprocess.run(["runc", "--root", str(root), "kill", entry.name, "KILL"],
                           capture_output=True, timeout=20, check=False)  # fmt: skip
            subprocess.run(["runc", "--root", str(root), "delete", "--force", entry.name],
                           capture_output=True, timeout=20, check=False)  # fmt: skip
        with contextlib.suppress(OSError):
            shutil.rmtree(root)

    def _cgroup_leftovers(self) -> None:
        # ctr puts containers at /<namespace>/<id>; runc removes the leaf, the
        # namespace level stays behind.
        candidates = [CGROUP_ROOT / self.namespace]
        if CGROUP_ROOT.is_dir():
            candidates += [p / self.namespace for p in CGROUP_ROOT.iterdir() if p.is_dir()]
        for cg in candidates:
            if not cg.is_dir():
                continue
            for sub in sorted(cg.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if sub.is_dir():
                    with contextlib.suppress(OSError):
                        sub.rmdir()
            with contextlib.suppress(OSError):
                cg.rmdir()

    def _mounts_under_tmp(self) -> list[str]:
        prefix = str(self.tmp) + "/"
        found = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].replace("\\040", " ")
                if mp.startswith(prefix):
                    found.append(mp)
        return found

    def _unmount_all(self) -> None:
        for _ in range(10):
            mounts = self._mounts_under_tmp()
            if not mounts:
                return
            for mp in sorted(mounts, key=len, reverse=True):
                subprocess.run(["umount", "-l", mp], capture_output=True, timeout=20, check=False)

    def _stop_helpers(self) -> None:
        """SIGKILL, by PID, what our shims left running besides themselves (a shim's
        helper processes, e.g. pyshim's fork template): whatever carries our marker."""
        for pid in processes_with_env(MARKER_ENV, str(self.tmp)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _may_unlink_shim_socket(self, path: str) -> bool:
        return True

    def close(self) -> None:
        """Remove everything this instance created; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        self._remember_shim_sockets()
        if not self.running:
            # Cleaning up through containerd is the clean way; it may have been
            # stopped or killed by the test.
            with contextlib.suppress(Exception):
                self.start()
        if self.running:
            try:
                self._remove_all_through_containerd()
            except Exception as exc:  # keep cleaning whatever failed
                errors.append(f"ctr cleanup: {exc!r}")
        self._remember_shim_sockets()
        self._stop(signal.SIGTERM)
        self._remember_shim_sockets()
        self._kill_shims()
        self._stop_helpers()
        self._runc_leftovers()
        self._cgroup_leftovers()
        self._unmount_all()
        for path in self._shim_sockets:
            with contextlib.suppress(OSError):
                if self._may_unlink_shim_socket(path):
                    os.unlink(path)
        shutil.rmtree(self.tmp, ignore_errors=True)
        if errors:
            raise ContainerdError("; ".join(errors))

    def __enter__(self) -> Containerd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
