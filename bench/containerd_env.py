"""A private containerd for the benchmarks: its own root, state, sockets and config
under a temp dir, started and stopped by PID, with everything it leaves behind
(containers, shims, mounts, runc state, cgroups, shim sockets) cleaned up even
when a benchmark fails half way.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.procfs import find_shims
from tests.support.template import stop_templates, template_pids

__all__ = ["CtrError", "Event", "EventWatcher", "PrivateContainerd"]

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
RUNC_ROOT = Path("/run/containerd/runc")
SHIM_SOCKET_DIR = Path("/run/containerd/s")
CGROUP_ROOT = Path("/sys/fs/cgroup")

_CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
# CRI is not under test and its start-up (CNI, streaming server) only adds noise.
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{grpc}"

[ttrpc]
  address = "{ttrpc}"

[debug]
  address = ""
  level = "{level}"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"""


class CtrError(RuntimeError):
    pass


class PrivateContainerd:
    def __init__(
        self,
        workdir: Path,
        *,
        namespace: str,
        path_prefix: Sequence[Path] = (VENV_BIN,),
        log_level: str = "info",
    ) -> None:
        self.workdir = workdir
        self.namespace = namespace
        self.root = workdir / "root"
        self.state = workdir / "state"
        self.fifo_dir = workdir / "fifo"
        self.grpc_address = str(workdir / "containerd.sock")
        self.ttrpc_address = self.grpc_address + ".ttrpc"
        self.config_path = workdir / "config.toml"
        self.log_path = workdir / "containerd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        # Every container id ever used, so cleanup can find shim sockets whose bundle
        # containerd already removed (a shim that failed during Create leaves one).
        self.container_ids: set[str] = set()
        self._log_file: Any = None
        path = [str(p) for p in path_prefix] + [os.environ.get("PATH", "/usr/bin:/bin")]
        # pyshim's fork template (shim/template.py) lives beside this containerd, so
        # the run measures (and close() stops) its own.
        self.template_dir = workdir / "template"
        self.env = {
            **os.environ,
            "PATH": ":".join(path),
            "PYSHIM_TEMPLATE_DIR": str(self.template_dir),
        }
        for d in (self.root, self.state, self.fifo_dir, workdir / "opt"):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            _CONFIG.format(
                root=self.root,
                state=self.state,
                grpc=self.grpc_address,
                ttrpc=self.ttrpc_address,
                level=log_level,
                opt=workdir / "opt",
            )
        )

    # -- lifecycle ---------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 30.0) -> float:
        """Start containerd; returns seconds until its gRPC socket accepts connections."""
        if self._proc is not None:
            raise RuntimeError("containerd already running")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.grpc_address)
        self._log_file = self.log_path.open("ab")
        t0 = time.perf_counter()
        self._proc = subprocess.Popen(
            ["containerd", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            env=self.env,
            # Its own session: a ^C on the bench goes to us, and we stop it by PID.
            start_new_session=True,
        )
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"containerd exited with {self._proc.returncode}; see {self.log_path}"
                )
            if _socket_accepts(self.grpc_address):
                return time.perf_counter() - t0
            time.sleep(0.002)
        raise RuntimeError(f"containerd not ready after {timeout}s; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL containerd (shims and containers stay up) and reap it."""
        self._signal_and_reap(signal.SIGKILL, 10.0)

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is None:
            return
        try:
            self._signal_and_reap(signal.SIGTERM, timeout)
        except subprocess.TimeoutExpired:
            self._signal_and_reap(signal.SIGKILL, 10.0)

    def _signal_and_reap(self, sig: int, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
        proc.wait(timeout=timeout)
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # -- ctr ---------------------------------------------------------------

    def ctr_argv(self, *args: str) -> list[str]:
        return ["ctr", "--address", self.grpc_address, "--namespace", self.namespace, *args]

    def ctr(
        self, *args: str, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.ctr_argv(*args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )
        if check and proc.returncode != 0:
            raise CtrError(
                f"ctr {' '.join(args)} failed ({proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()}"
            )
        return proc

    def import_image(self, archive: Path) -> None:
        self.ctr("images", "import", str(archive))

    def task_statuses(self) -> dict[str, str]:
        out = self.ctr("task", "ls", timeout=30).stdout
        statuses: dict[str, str] = {}
        for line in out.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3:
                statuses[parts[0]] = parts[2]
        return statuses

    def remove_container(self, cid: str, timeout: float = 30.0) -> None:
        """Kill, delete the task and the container; tolerant of any of them being gone."""
        self.ctr("task", "rm", "--force", cid, timeout=timeout, check=False)
        self.ctr("container", "rm", cid, timeout=timeout, check=False)

    def remove_containers(self, ids: Sequence[str], workers: int = 4) -> None:
        _run_parallel([functools.partial(self.remove_container, c) for c in ids], workers)

    def remove_all_containers(self) -> None:
        ids = self.ctr("container", "ls", "--quiet", timeout=30, check=False).stdout.split()
        self.remove_containers(ids)

    def shims(self) -> list[Any]:
        return find_shims(self.grpc_address)

    def template_pids(self) -> list[int]:
        """pyshim templates serving from our template dir (none for the Go shim)."""
        return template_pids(self.template_dir)

    def _stop_templates(self) -> None:
        stop_templates(self.template_dir)

    # -- cleanup -----------------------------------------------------------

    def close(self) -> None:
        """Leave the machine as we found it, whatever state the run ended in."""
        errors: list[str] = []

        def attempt(what: str, fn: Callable[[], None]) -> None:
            try:
                fn()
            except Exception as exc:  # cleanup keeps going; report at the end
                errors.append(f"{what}: {exc}")

        if self._proc is not None and self._proc.poll() is None:
            attempt("remove containers", self.remove_all_containers)
        # Addresses must be read before containerd or shims delete the bundles.
        sockets = self._shim_socket_paths()
        attempt("stop containerd", self.stop)
        attempt("kill leftover shims", self._kill_leftover_shims)
        attempt("stop templates", self._stop_templates)
        attempt("delete runc state", self._delete_runc_state)
        attempt("unmount", self._unmount_all)
        for path in sockets:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()
        attempt("remove cgroups", self._remove_cgroups)
        attempt("remove workdir", lambda: shutil.rmtree(self.workdir))
        if errors:
            raise RuntimeError("cleanup incomplete: " + "; ".join(errors))

    def _bundles(self) -> list[Path]:
        base = self.state / "io.containerd.runtime.v2.task" / self.namespace
        return sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def shim_socket_path(self, cid: str) -> Path:
        """Where a shim of the Go/pyshim address formula listens for container ``cid``."""
        key = f"{self.grpc_address}/{self.namespace}/{cid}".encode()
        return SHIM_SOCKET_DIR / hashlib.sha256(key).hexdigest()

    def _shim_socket_paths(self) -> list[Path]:
        paths = [self.shim_socket_path(cid) for cid in sorted(self.container_ids)]
        for bundle in self._bundles():
            with contextlib.suppress(OSError):
                address = (bundle / "address").read_text().strip()
                if address.startswith("unix://"):
                    path = Path(address.removeprefix("unix://"))
                    # Never unlink anything outside the shim socket directory.
                    if path.parent == SHIM_SOCKET_DIR:
                        paths.append(path)
        return paths

    def _kill_leftover_shims(self) -> None:
        for shim in find_shims(self.grpc_address):
            try:
                proc = psutil.Process(shim.pid)
                victims = [*proc.children(recursive=True), proc]
            except psutil.NoSuchProcess:
                continue
            for victim in victims:
                with contextlib.suppress(psutil.NoSuchProcess):
                    victim.kill()
            psutil.wait_procs(victims, timeout=5)

    def _delete_runc_state(self) -> None:
        root = RUNC_ROOT / self.namespace
        if not root.is_dir():
            return
        listing = subprocess.run(
            ["runc", "--root", str(root), "list", "--quiet"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        for cid in listing.stdout.split():
            subprocess.run(
                ["runc", "--root", str(root), "delete", "--force", cid],
                capture_output=True,
                timeout=30,
                check=False,
            )
        with contextlib.suppress(OSError):
            root.rmdir()

    def _unmount_all(self) -> None:
        prefix = str(self.workdir) + "/"
        targets = [m for m in _mount_points() if m.startswith(prefix)]
        # Deepest first, so nested mounts come off before their parents.
        for target in sorted(targets, key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)

    def _remove_cgroups(self) -> None:
        # ctr puts each container in /<namespace>/<id> of every hierarchy.
        if not CGROUP_ROOT.is_dir():
            return
        for hierarchy in CGROUP_ROOT.iterdir():
            ns_dir = hierarchy / self.namespace
            if not ns_dir.is_dir():
                continue
            for child in sorted(ns_dir.iterdir()):
                if child.is_dir():
                    with contextlib.suppress(OSError):
                        child.rmdir()
            with contextlib.suppress(OSError):
                ns_dir.rmdir()


def _socket_accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
        return True


def _mount_points() -> Iterator[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                # mountinfo escapes spaces etc. as octal.
                yield fields[4].encode().decode("unicode_escape")


def _run_parallel(jobs: Sequence[Callable[[], None]], workers: int) -> None:
    pending = list(jobs)
    lock = threading.Lock()
    failures: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                job = pending.pop()
            try:
                job()
            except Exception as exc:
                with lock:
                    failures.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]


@dataclass(frozen=True)
class Event:
    t: float  # time.perf_counter() when the line was read
    namespace: str
    topic: str
    payload: str


def parse_event_line(line: str) -> tuple[str, str, str] | None:
    """``ctr events`` prints ``<date> <time> <tz> <tz> <namespace> <topic> <json>``."""
    parts = line.rstrip("\n").split(" ", 6)
    if len(parts) < 6 or not parts[5].startswith("/"):
        return None
    return parts[4], parts[5], parts[6] if len(parts) == 7 else ""


class EventWatcher:
    """``ctr events`` in the background; every line timestamped when it arrives."""

    def __init__(self, env: PrivateContainerd) -> None:
        self._env = env
        self._events: list[Event] = []
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(
            ["ctr", "--address", self._env.grpc_address, "events"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env=self._env.env,
        )
        self._thread = threading.Thread(target=self._read, args=(self._proc,), daemon=True)
        self._thread.start()
        # The subscription is live once containerd has accepted the stream; there is
        # no ack, so give it a moment rather than miss the first event.
        time.sleep(0.3)

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            t = time.perf_counter()
            parsed = parse_event_line(line)
            if parsed is None:
                continue
            with self._cond:
                self._events.append(Event(t, *parsed))
                self._cond.notify_all()

    def wait_for(
        self, topic: str, match: Callable[[str], bool], *, since: float, timeout: float
    ) -> Event:
        deadline = time.perf_counter() + timeout
        with self._cond:
            while True:
                for ev in self._events:
                    if (
                        ev.t >= since
                        and ev.topic == topic
                        and ev.namespace == self._env.namespace
                        and match(ev.payload)
                    ):
                        return ev
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise TimeoutError(f"no {topic} event within {timeout}s")
                self._cond.wait(remaining)

    def clear(self) -> None:
        with self._cond:
            self._events.clear()

    def stop(self) -> None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            self._proc = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
