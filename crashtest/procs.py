"""/proc scans: shims, zombies, processes left in a container's cgroup."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    argv: tuple[str, ...]
    cgroup: str


def _read_proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            tail = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = tuple(a.decode(errors="replace") for a in f.read().split(b"\0")[:-1])
        with open(f"/proc/{pid}/cgroup") as f:
            cgroup = f.read().strip()
    except (OSError, IndexError):
        return None
    return Proc(pid, int(tail[1]), tail[0], argv, cgroup)


def scan() -> list[Proc]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            p = _read_proc(int(entry))
            if p is not None:
                found.append(p)
    return found


def flag(argv: Sequence[str], name: str) -> str | None:
    """A Go-style flag's value (-name v / --name v / -name=v)."""
    for i, arg in enumerate(argv):
        for prefix in (f"-{name}", f"--{name}"):
            if arg == prefix and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(prefix + "="):
                return arg[len(prefix) + 1 :]
    return None


def is_shim_daemon(p: Proc, address: str) -> bool:
    """The long-lived shim process serving ``address`` (not a start/delete invocation)."""
    if not p.argv or "containerd-shim" not in os.path.basename(p.argv[0]) + " ".join(p.argv[:2]):
        return False
    if p.state == "Z" or _invocation(p):
        return False
    return flag(p.argv, "address") == address and flag(p.argv, "id") is not None


def shims(address: str, procs: Iterable[Proc] | None = None) -> dict[str, int]:
    """container id -> pid of the shim daemon serving it.

    A child the daemon vforked (runc, a logger) shares its memory until it execs, so
    for that instant /proc shows it with the daemon's command line: a process whose
    parent also looks like the daemon is that child, not a second daemon.
    """
    matches = [p for p in (scan() if procs is None else procs) if is_shim_daemon(p, address)]
    pids = {p.pid for p in matches}
    return {flag(p.argv, "id") or "": p.pid for p in matches if p.ppid not in pids}


def _invocation(p: Proc) -> bool:
    """A shim's `start` or `delete` run (which may hold the socket for a moment)."""
    return "start" in p.argv or "delete" in p.argv


# /proc/net/unix: a socket in the listening state (SO_ACCEPTCON).
_LISTENING = "00010000"


def serving(paths: set[str], procs: Iterable[Proc] | None = None) -> dict[str, int]:
    """unix socket path -> pid of a process holding it listening, for ``paths``.

    /proc/net/unix names the listening sockets' inodes; an fd of the process shows
    ``socket:[inode]``. Paths nothing listens on (a dead shim's file) cost no fd scan.
    """
    inodes: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/net/unix") as f:
        next(f, None)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[3] == _LISTENING and fields[7] in paths:
                inodes[f"socket:[{fields[6]}]"] = fields[7]
    found: dict[str, int] = {}
    if not inodes:
        return found
    for p in scan() if procs is None else procs:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{p.pid}/fd"):
                with contextlib.suppress(OSError):
                    path = inodes.get(os.readlink(f"/proc/{p.pid}/fd/{fd}"))
                    # The first holder wins: a child that inherited the fd comes later.
                    if path is not None and p.state != "Z" and not _invocation(p):
                        found.setdefault(path, p.pid)
        if len(found) == len(set(inodes.values())):
            break
    return found


def alive(pid: int) -> bool:
    p = _read_proc(pid)
    return p is not None and p.state != "Z"


def zombies_of(parents: set[int], procs: Iterable[Proc] | None = None) -> set[tuple[int, int]]:
    return {
        (p.pid, p.ppid)
        for p in (scan() if procs is None else procs)
        if p.state == "Z" and p.ppid in parents
    }


def in_cgroup_of(ids: Iterable[str], procs: Iterable[Proc] | None = None) -> list[Proc]:
    """Processes whose cgroup path names one of ``ids`` (container processes)."""
    wanted = [f"/{i}" for i in ids if i]
    out = []
    for p in scan() if procs is None else procs:
        path = p.cgroup.rsplit(":", 1)[-1]
        if any(path.endswith(w) or f"{w}/" in path for w in wanted):
            out.append(p)
    return out


def cgroup_dirs_named(ids: set[str], depth: int = 3) -> list[str]:
    """Cgroup directories for ``ids``: a key with a slash ("ns/id") is looked up at
    the top of every hierarchy; a bare (unique) id is searched ``depth`` levels deep."""
    found: list[str] = []
    paths = {i for i in ids if "/" in i}
    ids = ids - paths
    tops = [CGROUP_ROOT] + [
        Path(e.path) for e in os.scandir(CGROUP_ROOT) if e.is_dir(follow_symlinks=False)
    ]
    for top in tops:
        for key in paths:
            if (top / key).is_dir():
                found.append(str(top / key))
    if not ids:
        return found

    def walk(d: Path, level: int) -> None:
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                if e.name in ids:
                    found.append(e.path)
                if level < depth:
                    walk(Path(e.path), level + 1)

    walk(CGROUP_ROOT, 1)
    return found


def mounts_under(prefix: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == prefix or mp.startswith(prefix.rstrip("/") + "/"):
                out.append(mp)
    return out


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGKILL a client we started (by its PID) and reap it."""
    if proc.poll() is None:
        kill_pid(proc.pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
