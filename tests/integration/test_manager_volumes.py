"""-v bind mounts, named volumes and --tmpfs through the real CLI, pyshimd and runc."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.support.manager import Manager, manager_session

pytestmark = pytest.mark.integration

IMAGE = "docker.io/library/bb:vol"


@pytest.fixture
def manager() -> Iterator[Manager]:
    with manager_session() as m:
        yield m


def test_bind_mounts_read_write_and_read_only(manager: Manager) -> None:
    host = manager.root / "shared"
    host.mkdir()
    (host / "in.txt").write_text("from host\n")
    res = manager.cli(
        "run", "--rm", "-v", f"{host}:/data", "--", "sh", "-c",
        "cat /data/in.txt && echo from container > /data/out.txt",
    )  # fmt: skip
    assert (res.returncode, res.stdout) == (0, "from host\n"), res.stderr
    assert (host / "out.txt").read_text() == "from container\n"
    res = manager.cli("run", "--rm", "-v", f"{host}:/data:ro", "--", "sh", "-c", "echo x > /data/y")
    assert res.returncode != 0 and "Read-only file system" in res.stderr + res.stdout
    assert not (host / "y").exists()
    # docker's -v: a missing host directory is made.
    res = manager.cli("run", "--rm", "-v", f"{host}/new:/n", "--", "true")
    assert res.returncode == 0 and (host / "new").is_dir(), res.stderr


def test_named_volumes_outlive_containers(manager: Manager) -> None:
    manager.import_busybox(IMAGE)
    assert manager.ok("volume", "create", "data").strip() == "data"
    manager.ok("run", "--name", "writer", "-v", "data:/d", IMAGE, "--", "sh", "-c", "echo 1 > /d/f")
    # Made on first use, like docker's.
    manager.ok("run", "--name", "auto", "-v", "made:/m", "--", "true")
    listed = {v["name"]: v for v in json.loads(manager.ok("volume", "ls", "--json"))}
    assert set(listed) == {"data", "made"}
    assert listed["data"]["used_by"] == ["writer"]
    assert "writer" in manager.ok("volume", "ls")
    busy = manager.cli("volume", "rm", "data")
    assert busy.returncode == 125 and "in use by writer" in busy.stderr
    manager.ok("rm", "writer", "auto")
    res = manager.cli("run", "--rm", "-v", "data:/d:ro", IMAGE, "--", "cat", "/d/f")
    assert (res.returncode, res.stdout) == (0, "1\n"), res.stderr
    manager.ok("volume", "rm", "data", "made")
    assert json.loads(manager.ok("volume", "ls", "--json")) == []
    gone = manager.cli("volume", "rm", "data")
    assert gone.returncode == 125 and "no such volume: data" in gone.stderr


def test_tmpfs_with_a_size(manager: Manager) -> None:
    res = manager.cli(
        "run", "--rm", "--tmpfs", "/cache:size=1m,mode=700", "--", "sh", "-c",
        "grep ' /cache ' /proc/mounts; stat -c %a /cache;"
        " dd if=/dev/zero of=/cache/big bs=1M count=2 2>/dev/null || echo full",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("tmpfs /cache tmpfs") and "size=1024k" in lines[0], lines
    assert lines[1:] == ["700", "full"]


def test_mount_errors_are_clear(manager: Manager) -> None:
    for args, want in (
        (["-v", "/a"], "expected HOST-DIR:DEST"),
        (["-v", "/a:rel"], "not an absolute path"),
        (["-v", "/a:/b:rx"], "expected HOST-DIR:DEST"),
        (["--tmpfs", "rel"], "not absolute"),
    ):
        res = manager.cli("run", *args, "--", "true")
        assert res.returncode == 2 and want in res.stderr, (args, res.stderr)
    for args, want in (
        (["--tmpfs", "/t:size=lots"], "--tmpfs: invalid size"),
        (["--tmpfs", "/t:bogus"], "--tmpfs: unknown option"),
        (["-v", "bad/name:/x"], "invalid volume name"),
        (["-v", "/tmp:/"], "other than /"),
        (["--tmpfs", "/t", "--tmpfs", "/t/"], "two mounts on /t"),
    ):
        res = manager.cli("run", *args, "--", "true")
        assert res.returncode == 125 and want in res.stderr, (args, res.stderr)
    assert manager.cli("volume", "--help").returncode == 0
    assert json.loads(manager.ok("ps", "--all", "--json")) == []
