"""A private containerd for the benchmarks: tests/support/containerd.Containerd (its
own root, state, sockets and config under a temp dir, started and stopped by PID,
with everything it leaves behind cleaned up even when a benchmark fails half way),
plus what the benchmarks measure it with.
"""

from __future__ import annotations

import functools
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procfs import find_shims
from shim.boot.launcher import is_launcher
from shim.boot.start import socket_address
from tests.support.containerd import Containerd, ContainerdError, socket_accepts
from tests.support.containerd2 import DEBIAN, Host

__all__ = ["CtrError", "Event", "EventWatcher", "PrivateContainerd", "launcher_problem"]

REPO = Path(__file__).resolve().parent.parent


class CtrError(ContainerdError):
    pass


def launcher_problem(bin_dir: Path, *names: str) -> str | None:
    """Why the programs ``names`` in ``bin_dir`` would not be measured as installed.

    scripts/install.sh writes the launcher (shim.boot.launcher: -IS, no site, no
    editable finder) over pip's console-script wrapper; a later `pip install -e .` puts
    the wrapper back, and every shim start then pays ~50 ms more (a quiet-machine `ctr
    run --rm` 1.33x the Go shim's instead of 1.02x): a bench run on it measures pip."""
    wrappers = [n for n in names if not is_launcher(str(bin_dir / n))]
    if not wrappers:
        return None
    return (
        f"{', '.join(wrappers)} in {bin_dir}: not pyshim's launcher (pip's console-script "
        "wrapper, put back by a `pip install` after scripts/install.sh?); the bench would "
        "measure pip's start. Rewrite it as scripts/install.sh does (its shim.boot.launcher "
        "lines)."
    )


class PrivateContainerd(Containerd):
    """Not started on construction; ``start()`` returns seconds until the gRPC socket
    accepts connections (the restart scenario's ``socket_ready``)."""

    # Readiness is the gRPC socket accepting, checked often: start() is measured.
    ready_poll_interval = 0.002

    def __init__(
        self, workdir: Path, *, namespace: str, log_level: str = "info", host: Host = DEBIAN
    ) -> None:
        super().__init__(
            namespace=namespace, tmp=workdir, log_level=log_level, start=False, host=host
        )
        self.fifo_dir = workdir / "fifo"
        self.fifo_dir.mkdir()
        # Every container id ever used, so cleanup can find shim sockets whose bundle
        # containerd already removed (a shim that failed during Create leaves one).
        self.container_ids: set[str] = set()

    def env(self) -> dict[str, str]:
        env = super().env()
        # pyshim's fork template (shim/boot/template.py) lives beside this containerd, so
        # the run measures (and close() stops) its own.
        env["PYSHIM_TEMPLATE_DIR"] = str(self.template_dir)
        return env

    def _ready(self) -> bool:
        return socket_accepts(self.address)

    # -- ctr ---------------------------------------------------------------

    def ctr(
        self,
        *args: str,
        input: bytes | str | None = None,
        check: bool = True,
        timeout: float = 120.0,
        namespace: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        proc = super().ctr(*args, input=input, check=False, timeout=timeout, namespace=namespace)
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

    def shims(self) -> list[Any]:
        sockets = {str(self.shim_socket_path(c)): c for c in self.container_ids}
        return find_shims(self.address, sockets)

    # -- cleanup -----------------------------------------------------------

    def shim_socket_path(self, cid: str) -> Path:
        """Where a shim of the Go/pyshim address formula listens for container ``cid``."""
        address = socket_address(self.address, self.namespace, cid, self.socket_dir)
        return Path(address.removeprefix("unix://"))

    def _remember_shim_sockets(self) -> None:
        super()._remember_shim_sockets()
        self._shim_sockets.update(str(self.shim_socket_path(c)) for c in self.container_ids)

    def _may_unlink_shim_socket(self, path: str) -> bool:
        # Never unlink anything outside the shim socket directory, nor a non-socket.
        p = Path(path)
        return p.parent == Path(self.socket_dir) and stat.S_ISSOCK(p.lstat().st_mode)

    def close(self) -> None:
        """Leave the machine as we found it, whatever state the run ended in."""
        super().close()
        if self.tmp.exists():
            raise CtrError(f"cleanup incomplete: {self.tmp} left behind")


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
            [self._env.host.ctr, "--address", self._env.address, "events"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env=self._env.env(),
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
