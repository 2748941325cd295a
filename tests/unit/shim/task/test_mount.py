from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.proto.types import mount_pb2
from shim.sys import syscalls
from shim.task.mount import PAGE_SIZE, MountError, mount_all, parse_options, unmount_all


def _mounted(path: Path) -> int:
    """How many mounts are stacked exactly on ``path``."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if line.split()[4] == target)


def _options(path: Path) -> set[str]:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        lines = [line.split() for line in f if line.split()[4] == target]
    return set(lines[-1][5].split(","))


def test_parse_flags_and_data() -> None:
    p = parse_options(["rbind", "ro", "nosuid", "size=1m", "defaults", "mode=755"])
    assert p.flags == syscalls.MS_BIND | syscalls.MS_REC | syscalls.MS_RDONLY | syscalls.MS_NOSUID
    assert p.data == "size=1m,defaults,mode=755"
    assert not p.loop


def test_parse_clearing_words_and_order() -> None:
    assert parse_options(["ro", "rw"]).flags == 0
    assert parse_options(["rw", "ro"]).flags == syscalls.MS_RDONLY
    assert parse_options(["noexec", "exec", "nodev", "dev", "nosuid", "suid"]).flags == 0
    assert parse_options(["relatime", "norelatime", "strictatime"]).flags == syscalls.MS_STRICTATIME
    assert parse_options(["sync", "async", "dirsync"]).flags == syscalls.MS_DIRSYNC
    assert parse_options(["noatime", "atime", "nodiratime"]).flags == syscalls.MS_NODIRATIME
    assert parse_options(["remount", "mand", "nomand"]).flags == syscalls.MS_REMOUNT
    assert parse_options(["loop", "ro"]).loop
    assert parse_options([]).data == ""


def test_unsupported_are_refused_before_any_syscall(tmp_path: Path) -> None:
    cases = [
        mount_pb2.Mount(type="ext4", source="/img", options=["loop"]),
        mount_pb2.Mount(type="fuse.sshfs", source="x:/", options=[]),
        mount_pb2.Mount(type="tmpfs", source="t", options=["x" * PAGE_SIZE]),
        mount_pb2.Mount(
            type="overlay", source="overlay", options=["lowerdir=" + "/a" * (PAGE_SIZE // 2)]
        ),
        mount_pb2.Mount(type="tmpfs", source="t", target="../../etc"),
    ]
    for m in cases:
        with pytest.raises(MountError):
            mount_all([m], str(tmp_path))
    with pytest.raises(MountError, match="mount options is too long"):
        mount_all([cases[2]], str(tmp_path))


def test_unmount_missing_path_is_fine(tmp_path: Path) -> None:
    unmount_all(str(tmp_path / "missing"))
    unmount_all(str(tmp_path))  # not a mount point


@pytest.fixture
def rootfs(tmp_path: Path) -> Iterator[Path]:
    target = tmp_path / "rootfs"
    target.mkdir()
    try:
        yield target
    finally:
        for _ in range(10):
            with contextlib.suppress(OSError):
                syscalls.umount2(str(target), syscalls.MNT_DETACH)


@pytest.mark.integration
def test_tmpfs_stack_and_unmount_all(rootfs: Path) -> None:
    mounts = [
        mount_pb2.Mount(type="tmpfs", source="one", options=["nosuid", "size=1m"]),
        mount_pb2.Mount(type="tmpfs", source="two", options=["nodev", "noexec", "size=1m"]),
    ]
    mount_all(mounts, str(rootfs))
    assert _mounted(rootfs) == 2
    assert {"nodev", "noexec"} <= _options(rootfs)
    unmount_all(str(rootfs))
    assert _mounted(rootfs) == 0


@pytest.mark.integration
def test_readonly_bind_is_remounted(rootfs: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_text("hello")
    mount_all(
        [mount_pb2.Mount(type="bind", source=str(source), options=["rbind", "ro"])], str(rootfs)
    )
    try:
        assert (rootfs / "f").read_text() == "hello"
        assert "ro" in _options(rootfs)
        with pytest.raises(OSError):
            (rootfs / "g").write_text("x")
    finally:
        unmount_all(str(rootfs))
    assert _mounted(rootfs) == 0
    assert not (source / "g").exists()


@pytest.mark.integration
def test_failure_undoes_earlier_mounts(rootfs: Path) -> None:
    mounts = [
        mount_pb2.Mount(type="tmpfs", source="ok", options=["size=1m"]),
        mount_pb2.Mount(type="no-such-fs", source="bad", options=[]),
    ]
    with pytest.raises(MountError, match="failed to mount bad"):
        mount_all(mounts, str(rootfs))
    assert _mounted(rootfs) == 0


@pytest.mark.integration
def test_target_inside_rootfs(rootfs: Path) -> None:
    (rootfs / "sub").mkdir()
    mount_all([mount_pb2.Mount(type="tmpfs", source="t", target="/sub", options=[])], str(rootfs))
    try:
        assert _mounted(rootfs / "sub") == 1
    finally:
        unmount_all(str(rootfs / "sub"))
    assert _mounted(rootfs / "sub") == 0
