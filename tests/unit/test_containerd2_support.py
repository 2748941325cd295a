"""Finding containerd 2.3 for the integration matrix and bench (tests/support)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from tests.support import containerd2, hosts
from tests.support.containerd import _config

FAKE_VERSION = "containerd github.com/containerd/containerd/v2 v2.3.4 db88095\n"


def _fake_bin(directory: Path, version: str = FAKE_VERSION) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in containerd2.BINARIES:
        path = directory / name
        path.write_text(f"#!/bin/sh\nprintf '%s' '{version}'\n")
        path.chmod(0o755)
    return directory


@pytest.fixture
def no_shared(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(containerd2.ENV, raising=False)
    monkeypatch.setattr(containerd2, "DEFAULT_TARBALL", tmp_path / "absent.tar.xz")


def test_directory_named_by_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_bin(tmp_path / "c2" / "bin")
    monkeypatch.setenv(containerd2.ENV, str(tmp_path / "c2"))
    host = containerd2.locate(tmp_path / "cache")
    assert host == containerd2.Host("2.3", tmp_path / "c2" / "bin")
    assert host.v2 and host.ctr == str(tmp_path / "c2" / "bin" / "ctr")


def test_environment_naming_nothing_usable_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(containerd2.ENV, str(tmp_path))
    with pytest.raises(containerd2.Containerd2NotFound, match=containerd2.ENV):
        containerd2.locate(tmp_path / "cache")


def test_a_1_x_containerd_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_bin(tmp_path / "old", version="containerd containerd.io 1.6.20 x\n")
    monkeypatch.setenv(containerd2.ENV, str(tmp_path / "old"))
    with pytest.raises(containerd2.Containerd2NotFound, match="not containerd 2"):
        containerd2.locate(tmp_path / "cache")


@pytest.mark.usefixtures("no_shared")
def test_missing_says_how_to_provide_it(tmp_path: Path) -> None:
    with pytest.raises(containerd2.Containerd2NotFound) as info:
        containerd2.locate(tmp_path / "cache")
    assert "containerd 2.3 was not found" in str(info.value)
    assert containerd2.ENV in str(info.value)


@pytest.mark.usefixtures("no_shared")
def test_missing_is_a_skip_outside_ci_and_a_failure_in_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"containerd 2\.3 was not found"):
        hosts.require("2.3", tmp_path)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"containerd 2\.3 was not found"):
        hosts.require("2.3", tmp_path)
    assert hosts.require("1.6", tmp_path) is containerd2.DEBIAN


def test_tarball_is_unpacked_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = _fake_bin(tmp_path / "src" / "bin")
    tarball = tmp_path / containerd2.TARBALL_NAME
    with tarfile.open(tarball, "w:xz") as tar:
        tar.add(src, arcname="bin")
        info = tarfile.TarInfo("bin/evil-link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info, io.BytesIO(b""))  # links are not unpacked at all
    monkeypatch.delenv(containerd2.ENV, raising=False)
    monkeypatch.setattr(containerd2, "DEFAULT_TARBALL", tarball)
    first = containerd2.locate(tmp_path / "cache")
    assert first.bin_dir is not None and first.bin_dir.parent.parent == tmp_path / "cache"
    assert not os.path.lexists(first.bin_dir / "evil-link")
    marker = first.bin_dir / "unpacked-before"
    marker.write_text("")
    assert containerd2.locate(tmp_path / "cache") == first and marker.exists()


def test_config_for_2_x(tmp_path: Path) -> None:
    text = _config(tmp_path, cri=False, log_level="info", host=containerd2.Host("2.3", tmp_path))
    assert text.startswith("version = 3\n")
    for line in (
        'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime", '
        '"io.containerd.cri.v1.images"]',
        "  disable = true",
        f'  socket_dir = "{tmp_path / "s"}"',
    ):
        assert line in text.splitlines()
    assert _config(tmp_path, cri=True, log_level="info").startswith("version = 2\n")
