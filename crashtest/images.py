"""Busybox rootfs, OCI runtime bundles and OCI image archives built from /bin/busybox.

Nothing is pulled: everything here comes from the static busybox that the distribution
installs (busybox-static), so the crash tool and pyshim's test suites run offline and
the bytes are reproducible.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import stat
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "APPLETS",
    "BUSYBOX",
    "DEFAULT_PATH",
    "build_busybox_oci_archive",
    "build_busybox_rootfs",
    "oci_config",
    "write_oci_bundle",
]

BUSYBOX = Path("/bin/busybox")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

APPLETS: tuple[str, ...] = (
    "cat", "dd", "echo", "env", "false", "head", "id", "kill", "ls", "mkdir", "ps",
    "pwd", "rm", "seq", "sh", "sha256sum", "sleep", "stty", "tail", "test", "touch",
    "tr", "true", "tty", "wc", "yes",
)  # fmt: skip

_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n"
_EMPTY_DIRS = ("dev", "proc", "sys", "tmp", "root", "etc")

# A fixed timestamp keeps the layer digest identical from run to run (2000-01-01).
_FIXED_MTIME = 946684800


def build_busybox_rootfs(dest: Path, extra_applets: Sequence[str] = ()) -> Path:
    """Populate ``dest`` with /bin/busybox, its applet links and a minimal /etc."""
    if not BUSYBOX.is_file():
        raise FileNotFoundError(f"{BUSYBOX} is missing: install busybox-static")
    dest.mkdir(parents=True, exist_ok=True)
    bindir = dest / "bin"
    bindir.mkdir(exist_ok=True)
    shutil.copy2(BUSYBOX, bindir / "busybox")
    (bindir / "busybox").chmod(0o755)
    for applet in (*APPLETS, *extra_applets):
        link = bindir / applet
        if not link.is_symlink():
            link.symlink_to("busybox")
    for name in _EMPTY_DIRS:
        (dest / name).mkdir(exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    (dest / "etc" / "passwd").write_text(_PASSWD)
    (dest / "etc" / "group").write_text(_GROUP)
    return dest


def _default_mounts() -> list[dict[str, Any]]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
        },
    ]


def oci_config(
    args: Sequence[str],
    *,
    terminal: bool = False,
    root_path: str = "rootfs",
    readonly: bool = False,
    env: Sequence[str] = (),
    cwd: str = "/",
    hostname: str = "pyshim",
    pid_namespace: bool = True,
    cgroups_path: str | None = None,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A runtime config shaped like ``runc spec`` output (its defaults, our process)."""
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    namespaces = [{"type": t} for t in ("network", "ipc", "uts", "mount")]
    if pid_namespace:
        namespaces.insert(0, {"type": "pid"})
    linux: dict[str, Any] = {
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "namespaces": namespaces,
        "maskedPaths": [
            "/proc/acpi",
            "/proc/asound",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/sys/firmware",
            "/proc/scsi",
        ],
        "readonlyPaths": [
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger",
        ],
    }
    if cgroups_path is not None:
        linux["cgroupsPath"] = cgroups_path
    config: dict[str, Any] = {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": [f"PATH={DEFAULT_PATH}", "TERM=xterm", *env],
            "cwd": cwd,
            "capabilities": {k: list(caps) for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": root_path, "readonly": readonly},
        "hostname": hostname,
        "mounts": _default_mounts(),
        "linux": linux,
    }
    if annotations:
        config["annotations"] = dict(annotations)
    return config


def write_oci_bundle(
    bundle: Path,
    args: Sequence[str],
    *,
    terminal: bool = False,
    rootfs: Path | None = None,
    readonly: bool = False,
    env: Sequence[str] = (),
    cwd: str = "/",
    pid_namespace: bool = True,
    cgroups_path: str | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Path:
    """Write ``bundle/config.json``; without ``rootfs`` a busybox rootfs goes in ``bundle/rootfs``.

    ``rootfs`` given: it is used as is (absolute path in the config), so a test can
    mount something there first, as the shim does with the task's rootfs mounts.
    """
    bundle.mkdir(parents=True, exist_ok=True)
    if rootfs is None:
        root_path = "rootfs"
        build_busybox_rootfs(bundle / "rootfs")
    else:
        root_path = str(rootfs.resolve())
    config = oci_config(
        args,
        terminal=terminal,
        root_path=root_path,
        readonly=readonly,
        env=env,
        cwd=cwd,
        pid_namespace=pid_namespace,
        cgroups_path=cgroups_path,
        annotations=annotations,
    )
    (bundle / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return bundle


def _oci_arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
        machine, machine
    )


def _tar_info(name: str, st: os.stat_result, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = _FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = stat.S_IMODE(st.st_mode)
    if link:
        info.type = tarfile.SYMTYPE
        info.linkname = link
        info.mode = 0o777
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    else:
        info.size = st.st_size
    return info


def _sorted_tree(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        # Directories before their contents; names in a stable order.
        for name in sorted(dirnames + filenames):
            yield base / name


def _layer_tar(rootfs: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries = sorted(_sorted_tree(rootfs), key=lambda p: p.relative_to(rootfs).parts)
        for path in entries:
            rel = path.relative_to(rootfs).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                tar.addfile(_tar_info(rel, st, os.readlink(path)))
            elif stat.S_ISDIR(st.st_mode):
                tar.addfile(_tar_info(rel + "/", st))
            else:
                with path.open("rb") as f:
                    tar.addfile(_tar_info(rel, st), f)
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    # mtime=0 and no file name in the header: the compressed digest stays stable.
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="") as gz:
        gz.write(data)
    return out.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build_busybox_oci_archive(
    dest_tar: Path, ref: str = "docker.io/library/busybox:latest", extra_applets: Sequence[str] = ()
) -> Path:
    """Write an OCI image layout tar (one gzip layer) that ``ctr images import`` accepts."""
    staging = dest_tar.parent / (dest_tar.name + ".rootfs")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        build_busybox_rootfs(staging, extra_applets)
        layer = _layer_tar(staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    layer_gz = _gzip(layer)
    arch = _oci_arch()
    config = {
        "architecture": arch,
        "os": "linux",
        "created": "2000-01-01T00:00:00Z",
        "config": {"Env": [f"PATH={DEFAULT_PATH}"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
        "history": [{"created": "2000-01-01T00:00:00Z", "created_by": "pyshim tests"}],
    }
    config_bytes = _canonical(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": _digest(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": _digest(layer_gz),
                "size": len(layer_gz),
            }
        ],
    }
    manifest_bytes = _canonical(manifest)
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": _digest(manifest_bytes),
                "size": len(manifest_bytes),
                "platform": {"architecture": arch, "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": ref,
                    "org.opencontainers.image.ref.name": tag,
                },
            }
        ],
    }
    blobs = {_digest(b): b for b in (layer_gz, config_bytes, manifest_bytes)}
    files: dict[str, bytes] = {
        "oci-layout": _canonical({"imageLayoutVersion": "1.0.0"}),
        "index.json": _canonical(index),
    }
    for digest, data in blobs.items():
        files["blobs/sha256/" + digest.removeprefix("sha256:")] = data

    dest_tar.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest_tar, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirname in ("blobs/", "blobs/sha256/"):
            info = tarfile.TarInfo(dirname)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = _FIXED_MTIME
            tar.addfile(info)
        for name in sorted(files):
            data = files[name]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = _FIXED_MTIME
            tar.addfile(info, io.BytesIO(data))
    return dest_tar
