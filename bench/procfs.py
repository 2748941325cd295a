"""/proc readers for shim memory, wake-ups and discovery.

The parsers take text and are unit tested; the readers are thin wrappers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MemoryUsage",
    "ShimProcess",
    "Wakeups",
    "find_shims",
    "parse_ctxt_switches",
    "parse_ppid",
    "parse_smaps_rollup",
    "parse_stat_cpu_ticks",
    "parse_unix_sockets",
    "read_memory",
    "read_wakeups",
    "shim_from_cmdline",
]

PROC = Path("/proc")
_SHIM_PREFIX = "containerd-shim-"


@dataclass(frozen=True)
class MemoryUsage:
    rss_kb: int
    pss_kb: int
    private_kb: int
    # The PSS of file pages (executables, libraries): shared with every process that
    # maps the same files, shim or not. 0 where the kernel does not say (before 5.9).
    pss_file_kb: int = 0

    def __add__(self, other: MemoryUsage) -> MemoryUsage:
        return MemoryUsage(
            self.rss_kb + other.rss_kb,
            self.pss_kb + other.pss_kb,
            self.private_kb + other.private_kb,
            self.pss_file_kb + other.pss_file_kb,
        )


def parse_smaps_rollup(text: str) -> MemoryUsage:
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[key.strip()] = int(parts[0])
    if "Rss" not in fields or "Pss" not in fields:
        raise ValueError("smaps_rollup without Rss/Pss")
    return MemoryUsage(
        rss_kb=fields["Rss"],
        pss_kb=fields["Pss"],
        private_kb=fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
        pss_file_kb=fields.get("Pss_File", 0),
    )


def parse_ctxt_switches(status_text: str) -> tuple[int, int]:
    """(voluntary, nonvoluntary) from a /proc/<pid>[/task/<tid>]/status text."""
    vol = nonvol = None
    for line in status_text.splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            vol = int(line.split()[1])
        elif line.startswith("nonvoluntary_ctxt_switches:"):
            nonvol = int(line.split()[1])
    if vol is None or nonvol is None:
        raise ValueError("status without ctxt_switches")
    return vol, nonvol


def parse_stat_cpu_ticks(stat_text: str) -> int:
    """utime+stime (clock ticks, all threads) from /proc/<pid>/stat.

    The command name (field 2) may contain spaces and parentheses, so fields are
    counted from the last ')'.
    """
    rest = stat_text[stat_text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(rest[11]) + int(rest[12])


def parse_ppid(stat_text: str) -> int:
    rest = stat_text[stat_text.rindex(")") + 2 :].split()
    return int(rest[1])


@dataclass(frozen=True)
class ShimProcess:
    pid: int
    binary: str  # e.g. containerd-shim-runc-v2
    runtime: str  # e.g. io.containerd.runc.v2
    container_id: str


def shim_from_cmdline(pid: int, argv: Sequence[str], address: str) -> ShimProcess | None:
    """A long-lived shim daemon serving the containerd at ``address``, else None.

    Go shims run as their own binary; a Python shim may show up as
    ``python …/containerd-shim-pyshim-v1 …``, so any of the first argv words may
    name the binary. ``start``/``delete`` invocations end with an action word and
    are not daemons.
    """
    binary = _shim_binary(argv)
    if binary is None:
        return None
    flags = _go_flags(argv)
    if flags.get("address") != address:
        return None
    if argv and argv[-1] in ("start", "delete"):
        return None
    return ShimProcess(
        pid=pid, binary=binary, runtime=_runtime(binary), container_id=flags.get("id", "")
    )


def _shim_binary(argv: Sequence[str]) -> str | None:
    return next(
        (os.path.basename(a) for a in argv[:3] if os.path.basename(a).startswith(_SHIM_PREFIX)),
        None,
    )


def _runtime(binary: str) -> str:
    parts = binary[len(_SHIM_PREFIX) :].rsplit("-", 1)
    return f"io.containerd.{parts[0]}.{parts[1]}" if len(parts) == 2 else binary


def parse_unix_sockets(text: str) -> dict[int, str]:
    """Inode -> path of the named sockets in a /proc/net/unix text (abstract ones,
    shown with a leading '@', and unnamed ones are left out)."""
    found: dict[int, str] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7].startswith("/") and fields[6].isdigit():
            found[int(fields[6])] = fields[7]
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    for entry in os.scandir(PROC / str(pid) / "fd"):
        try:
            target = os.readlink(entry.path)
        except OSError:
            continue
        if target.startswith("socket:[") and target.endswith("]"):
            inodes.add(int(target[8:-1]))
    return inodes


def _go_flags(argv: Sequence[str]) -> dict[str, str]:
    flags: dict[str, str] = {}
    i = 0
    while i < len(argv):
        word = argv[i]
        if word.startswith("-") and len(word) > 1:
            name, eq, value = word.lstrip("-").partition("=")
            if eq:
                flags[name] = value
            elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                flags[name] = argv[i + 1]
                i += 1
        i += 1
    return flags


def _pids() -> Iterator[int]:
    for entry in os.scandir(PROC):
        if entry.name.isdigit():
            yield int(entry.name)


def find_shims(address: str, sockets: Mapping[str, str] | None = None) -> list[ShimProcess]:
    """Shim daemons re-parented to init whose ``-address`` is our containerd's socket.

    A shim forked from pyshim's template shows its own command line only where the
    kernel lets it set one (PR_SET_MM_MAP: not under User-Mode Linux); elsewhere it
    shows the template's. With ``sockets`` (shim socket path -> container id), such a
    process is found by the shim socket it holds instead.
    """
    found: list[ShimProcess] = []
    listeners: dict[int, str] | None = None
    for pid in _pids():
        try:
            stat_text = (PROC / str(pid) / "stat").read_text()
            if parse_ppid(stat_text) != 1:
                continue
            raw = (PROC / str(pid) / "cmdline").read_bytes()
            argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
            shim = shim_from_cmdline(pid, argv, address)
            if shim is None and sockets and _shim_binary(argv) is not None:
                if listeners is None:
                    listeners = parse_unix_sockets((PROC / "net" / "unix").read_text())
                shim = _shim_by_socket(pid, argv, sockets, listeners)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if shim is not None:
            found.append(shim)
    return sorted(found, key=lambda s: s.pid)


def _shim_by_socket(
    pid: int, argv: Sequence[str], sockets: Mapping[str, str], listeners: Mapping[int, str]
) -> ShimProcess | None:
    for inode in _socket_inodes(pid):
        cid = sockets.get(listeners.get(inode, ""))
        if cid is not None:
            binary = _shim_binary(argv) or ""
            return ShimProcess(pid=pid, binary=binary, runtime=_runtime(binary), container_id=cid)
    return None


def read_memory(pid: int) -> MemoryUsage:
    return parse_smaps_rollup((PROC / str(pid) / "smaps_rollup").read_text())


@dataclass(frozen=True)
class Wakeups:
    voluntary: int
    nonvoluntary: int
    cpu_ticks: int
    threads: int

    @property
    def switches(self) -> int:
        return self.voluntary + self.nonvoluntary


def read_wakeups(pid: int) -> Wakeups:
    """Context switches summed over every thread (the process's own status line only
    counts its main thread, and a Go shim runs several)."""
    vol = nonvol = threads = 0
    for task in os.scandir(PROC / str(pid) / "task"):
        try:
            v, n = parse_ctxt_switches(Path(task.path, "status").read_text())
        except FileNotFoundError:
            continue  # thread exited between listing and reading
        vol += v
        nonvol += n
        threads += 1
    ticks = parse_stat_cpu_ticks((PROC / str(pid) / "stat").read_text())
    return Wakeups(vol, nonvol, ticks, threads)
