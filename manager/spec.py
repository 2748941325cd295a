"""OCI runtime specs the manager writes into each bundle, and exec process specs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What `runc spec` grants: enough for ordinary programs, nothing that reaches the host.
DEFAULT_CAPS = [
    "CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_CHOWN", "CAP_DAC_OVERRIDE",
    "CAP_FOWNER", "CAP_FSETID", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_RAW",
    "CAP_SYS_CHROOT", "CAP_MKNOD", "CAP_SETFCAP",
]  # fmt: skip
HOST_VIEW_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
CPU_PERIOD = 100_000


class SpecError(ValueError):
    pass


@dataclass(frozen=True)
class User:
    uid: int
    gid: int


def parse_user(text: str) -> User:
    """``UID[:GID]``, numeric only: names would need the container's /etc/passwd."""
    uid_s, _, gid_s = text.partition(":")
    try:
        uid = int(uid_s)
        gid = int(gid_s) if gid_s else uid
    except ValueError:
        raise SpecError(f"user {text!r}: expected numeric UID[:GID]") from None
    if uid < 0 or gid < 0:
        raise SpecError(f"user {text!r}: ids must not be negative")
    return User(uid, gid)


@dataclass(frozen=True)
class ProcessOptions:
    args: Sequence[str]
    env: Sequence[str] = ()
    workdir: str = ""
    user: str = ""
    terminal: bool = False
    # Columns and rows of the pty from its creation, so the first output is laid out
    # right (a ResizePty after start would race the process).
    console_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class ImageDefaults:
    """The parts of an image config that shape the container's process."""

    entrypoint: Sequence[str] = ()
    cmd: Sequence[str] = ()
    env: Sequence[str] = ()
    workdir: str = ""
    user: str = ""


@dataclass(frozen=True)
class RootView:
    """Which root the container sees.

    ``path``: root.path in the spec ("rootfs" = the bundle's, mounted by the shim).
    ``host_view``: read-only binds of the host's system dirs onto an empty root.
    """

    path: str = "rootfs"
    readonly: bool = False
    host_view: bool = False
    host_binds: Sequence[str] = field(default_factory=tuple)


def host_view(host_root: Path = Path("/")) -> tuple[RootView, list[tuple[str, str]]]:
    """The default root: binds for real dirs, and the symlinks (merged-/usr) to recreate."""
    binds: list[str] = []
    links: list[tuple[str, str]] = []
    for d in HOST_VIEW_DIRS:
        host = host_root / d.lstrip("/")
        if host.is_symlink():
            links.append((d, os.readlink(host)))
        elif host.is_dir():
            binds.append(d)
    return RootView(path="rootfs", readonly=True, host_view=True, host_binds=tuple(binds)), links


def merge_env(base: Sequence[str], override: Sequence[str]) -> list[str]:
    """Later K=V wins over earlier ones with the same K; order of first appearance kept."""
    merged: dict[str, str] = {}
    for item in (*base, *override):
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise SpecError(f"environment entry {item!r}: expected K=V")
        merged[key] = item
    return list(merged.values())


def resolve_process(opts: ProcessOptions, image: ImageDefaults | None) -> ProcessOptions:
    """Fill what the user left out from the image, the way docker does."""
    image = image or ImageDefaults()
    # As docker: the user's command replaces the image's Cmd, never its Entrypoint.
    args = [*image.entrypoint, *(opts.args or image.cmd)]
    if not args:
        raise SpecError("no command given and the image has no default command")
    env = merge_env([f"PATH={DEFAULT_PATH}", *image.env], opts.env)
    if opts.terminal and not any(e.startswith("TERM=") for e in env):
        env.append("TERM=xterm")
    return ProcessOptions(
        args=args,
        env=env,
        workdir=opts.workdir or image.workdir or "/",
        user=opts.user or image.user,
        terminal=opts.terminal,
        console_size=opts.console_size,
    )


def process_spec(opts: ProcessOptions) -> dict[str, Any]:
    if not opts.workdir.startswith("/"):
        raise SpecError(f"workdir {opts.workdir!r} must be an absolute path")
    user = parse_user(opts.user) if opts.user else User(0, 0)
    caps = list(DEFAULT_CAPS)
    extra: dict[str, Any] = {}
    if opts.terminal and opts.console_size and all(opts.console_size):
        width, height = opts.console_size
        extra["consoleSize"] = {"width": width, "height": height}
    return {
        **extra,
        "terminal": opts.terminal,
        "user": {"uid": user.uid, "gid": user.gid},
        "args": list(opts.args),
        "env": list(opts.env),
        "cwd": opts.workdir,
        "capabilities": {k: list(caps) for k in ("bounding", "effective", "permitted")},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
    }


def _base_mounts() -> list[dict[str, Any]]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]  # fmt: skip


def resources(memory_bytes: int, cpus: float) -> dict[str, Any]:
    res: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if memory_bytes < 0:
        raise SpecError("memory limit must not be negative")
    if cpus < 0:
        raise SpecError("cpus must not be negative")
    if memory_bytes:
        res["memory"] = {"limit": memory_bytes}
    if cpus:
        res["cpu"] = {"quota": max(1000, round(cpus * CPU_PERIOD)), "period": CPU_PERIOD}
    return res


def bind_mount(source: str, destination: str, readonly: bool) -> dict[str, Any]:
    options = ["rbind", "rprivate"] + (["ro"] if readonly else [])
    return {"destination": destination, "type": "bind", "source": source, "options": options}


def tmpfs_mount(destination: str, options: Sequence[str]) -> dict[str, Any]:
    opts = ["nosuid", "nodev", *options]
    if not any(o.startswith("mode=") for o in options):
        opts.append("mode=1777")
    return {"destination": destination, "type": "tmpfs", "source": "tmpfs", "options": opts}


def _namespaces(network: str, netns_path: str) -> list[dict[str, str]]:
    spaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if network == "bridge":
        if not netns_path:
            raise SpecError("a bridge network needs its namespace's path")
        spaces.append({"type": "network", "path": netns_path})
    elif network == "none":
        spaces.append({"type": "network"})
    elif network != "host":
        raise SpecError(f"unknown network {network!r}: bridge, host or none")
    return spaces


def container_spec(
    process: ProcessOptions,
    root: RootView,
    *,
    hostname: str,
    memory_bytes: int = 0,
    cpus: float = 0.0,
    cgroups_path: str | None = None,
    network: str = "none",
    netns_path: str = "",
    extra_mounts: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """``network``: host (the host's namespace), none (a new, empty one), bridge (the
    namespace at ``netns_path``, which CNI has set up)."""
    mounts = _base_mounts()
    if root.host_view:
        mounts += [
            {"destination": d, "type": "bind", "source": d,
             "options": ["rbind", "ro", "nosuid", "nodev"]}
            for d in root.host_binds
        ]  # fmt: skip
        # The root is read-only; programs still expect somewhere to write.
        mounts.append(
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777", "size=65536k"]}
        )  # fmt: skip
    # After the base and host-view mounts, so a user's mount can cover any of them.
    mounts += extra_mounts
    linux: dict[str, Any] = {
        "resources": resources(memory_bytes, cpus),
        "namespaces": _namespaces(network, netns_path),
        "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                        "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                        "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                          "/proc/sysrq-trigger"],
    }  # fmt: skip
    if cgroups_path:
        linux["cgroupsPath"] = cgroups_path
    return {
        "ociVersion": "1.0.2-dev",
        "process": process_spec(process),
        "root": {"path": root.path, "readonly": root.readonly},
        "hostname": hostname,
        "mounts": mounts,
        "linux": linux,
    }
