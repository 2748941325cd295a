"""OCI spec generation for manager containers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from manager import spec


def test_user_parsing() -> None:
    assert spec.parse_user("1000") == spec.User(1000, 1000)
    assert spec.parse_user("1000:50") == spec.User(1000, 50)
    for bad in ("root", "1:x", "-1"):
        with pytest.raises(spec.SpecError):
            spec.parse_user(bad)


def test_env_merge_later_wins_and_rejects_garbage() -> None:
    assert spec.merge_env(["PATH=/a", "X=1"], ["X=2", "Y=3"]) == ["PATH=/a", "X=2", "Y=3"]
    with pytest.raises(spec.SpecError):
        spec.merge_env([], ["NOEQUALS"])


def test_image_defaults_fill_the_gaps() -> None:
    image = spec.ImageDefaults(
        entrypoint=["/entry"], cmd=["default"], env=["A=img"], workdir="/w", user="5"
    )
    p = spec.resolve_process(spec.ProcessOptions(args=[], env=["A=me"]), image)
    assert p.args == ["/entry", "default"]
    assert "A=me" in p.env and "A=img" not in p.env
    assert p.workdir == "/w" and p.user == "5"
    p = spec.resolve_process(spec.ProcessOptions(args=["x"], workdir="/o"), image)
    assert p.args == ["/entry", "x"] and p.workdir == "/o"
    with pytest.raises(spec.SpecError):
        spec.resolve_process(spec.ProcessOptions(args=[]), None)


def test_host_view_binds_real_dirs_and_recreates_symlinks(tmp_path: Path) -> None:
    (tmp_path / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    (tmp_path / "bin").symlink_to("usr/bin")
    root, links = spec.host_view(tmp_path)
    assert root.readonly and root.host_view
    assert set(root.host_binds) == {"/usr", "/etc"}
    assert links == [("/bin", "usr/bin")]


def test_default_container_spec_is_read_only_host_view() -> None:
    root, _ = spec.host_view()
    proc = spec.resolve_process(spec.ProcessOptions(args=["echo", "hello"]), None)
    s = spec.container_spec(proc, root, hostname="c1")
    assert s["root"] == {"path": "rootfs", "readonly": True}
    assert s["process"]["args"] == ["echo", "hello"]
    assert s["process"]["cwd"] == "/"
    by_dest = {m["destination"]: m for m in s["mounts"]}
    assert by_dest["/usr"]["type"] == "bind" and "ro" in by_dest["/usr"]["options"]
    assert by_dest["/tmp"]["type"] == "tmpfs"
    assert by_dest["/proc"]["type"] == "proc"
    assert "/dev" in by_dest
    if not os.path.islink("/bin"):
        assert "/bin" in by_dest
    assert "memory" not in s["linux"]["resources"]
    assert "cgroupsPath" not in s["linux"]


def test_limits_and_user_land_in_the_spec() -> None:
    proc = spec.resolve_process(
        spec.ProcessOptions(args=["sh"], user="1000:100", terminal=True, workdir="/tmp"), None
    )
    s = spec.container_spec(
        proc,
        spec.RootView(path="/some/dir"),
        hostname="h",
        memory_bytes=64 << 20,
        cpus=1.5,
        cgroups_path="/pyshim/x",
    )
    assert s["process"]["user"] == {"uid": 1000, "gid": 100}
    assert s["process"]["terminal"] is True
    assert any(e.startswith("TERM=") for e in s["process"]["env"])
    assert s["linux"]["resources"]["memory"] == {"limit": 64 << 20}
    assert s["linux"]["resources"]["cpu"] == {"quota": 150000, "period": 100000}
    assert s["linux"]["cgroupsPath"] == "/pyshim/x"
    assert s["root"] == {"path": "/some/dir", "readonly": False}


def test_relative_workdir_is_rejected() -> None:
    with pytest.raises(spec.SpecError):
        spec.process_spec(spec.ProcessOptions(args=["x"], workdir="rel"))


def test_console_size_only_with_a_terminal() -> None:
    opts = spec.ProcessOptions(args=["sh"], workdir="/", terminal=True, console_size=(101, 33))
    assert spec.process_spec(opts)["consoleSize"] == {"width": 101, "height": 33}
    no_tty = spec.ProcessOptions(args=["sh"], workdir="/", console_size=(101, 33))
    assert "consoleSize" not in spec.process_spec(no_tty)
    unknown = spec.ProcessOptions(args=["sh"], workdir="/", terminal=True, console_size=(0, 0))
    assert "consoleSize" not in spec.process_spec(unknown)
