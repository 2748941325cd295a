"""Image import and layer unpacking (tars built here; mknod/xattrs need root, as CI has)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from crashtest.images import build_busybox_oci_archive
from manager import images
from manager.images import ImageError, ImageNotFound, ImageStore, normalize_ref


def _tar(entries: Sequence[tuple[str, str, bytes | str]]) -> bytes:
    """(name, kind, data): kind f=file d=dir l=symlink h=hardlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            if kind == "d":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            elif kind in ("l", "h"):
                info.type = tarfile.SYMTYPE if kind == "l" else tarfile.LNKTYPE
                info.linkname = str(data)
                tar.addfile(info)
            else:
                raw = data.encode() if isinstance(data, str) else data
                info.size = len(raw)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def test_whiteouts_become_overlay_whiteouts(tmp_path: Path) -> None:
    layer = _tar(
        [
            ("etc/", "d", ""),
            ("etc/.wh.passwd", "f", ""),
            ("var/", "d", ""),
            ("var/cache/", "d", ""),
            ("var/cache/.wh..wh..opq", "f", ""),
            ("var/cache/new", "f", "n"),
            ("bin/", "d", ""),
            ("bin/sh", "f", "#!"),
            ("bin/ash", "h", "bin/sh"),
            ("bin/dash", "l", "sh"),
        ]
    )
    dest = tmp_path / "layer"
    images.unpack_layer(io.BytesIO(layer), dest)
    st = os.lstat(dest / "etc" / "passwd")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert not (dest / "etc" / ".wh.passwd").exists()
    assert os.getxattr(dest / "var" / "cache", images.OPAQUE_XATTR) == b"y"
    assert not (dest / "var" / "cache" / ".wh..wh..opq").exists()
    assert (dest / "var" / "cache" / "new").read_text() == "n"
    assert os.stat(dest / "bin" / "ash").st_ino == os.stat(dest / "bin" / "sh").st_ino
    assert os.readlink(dest / "bin" / "dash") == "sh"


@pytest.mark.parametrize(
    "entries",
    [
        [("../evil", "f", "x")],
        [("a/../../evil", "f", "x")],
        [("link", "l", "/"), ("link/etc/evil", "f", "x")],
        [("h", "h", "../../etc/passwd")],
    ],
)
def test_layer_cannot_escape(tmp_path: Path, entries: list[tuple[str, str, str]]) -> None:
    dest = tmp_path / "layer"
    with pytest.raises(ImageError):
        images.unpack_layer(io.BytesIO(_tar(entries)), dest)
    assert not (tmp_path / "evil").exists()


def test_normalize_ref() -> None:
    assert normalize_ref("busybox") == "docker.io/library/busybox:latest"
    assert normalize_ref("me/app:1") == "docker.io/me/app:1"
    assert normalize_ref("localhost:5000/app") == "localhost:5000/app:latest"
    assert normalize_ref("quay.io/a/b@sha256:ab") == "quay.io/a/b@sha256:ab"
    with pytest.raises(ImageError):
        normalize_ref("bad ref")


def test_import_oci_layout_and_overlay_mount(tmp_path: Path) -> None:
    archive = build_busybox_oci_archive(tmp_path / "bb.tar", ref="docker.io/library/busybox:1")
    store = ImageStore(tmp_path / "images")
    [entry] = store.import_archive(archive)
    assert entry.ref == "docker.io/library/busybox:1"
    assert len(entry.layers) == 1
    layer_dir = store.layer_dir(entry.layers[0])
    assert (layer_dir / "bin" / "busybox").is_file()
    assert os.readlink(layer_dir / "bin" / "sh") == "busybox"
    resolved = store.resolve("busybox:1")
    assert resolved.defaults.cmd == ["sh"]
    mount = store.overlay_mount(resolved, tmp_path / "c1")
    assert mount.type == "overlay"
    assert f"lowerdir={layer_dir}" in mount.options
    assert f"upperdir={tmp_path / 'c1' / 'upper'}" in mount.options
    # A second import of the same layers unpacks nothing again.
    before = layer_dir.stat().st_ino
    store.import_archive(archive)
    assert layer_dir.stat().st_ino == before
    assert [e.ref for e in store.list()] == ["docker.io/library/busybox:1"]


def _docker_archive(path: Path, layers: list[bytes], tags: list[str]) -> list[str]:
    diff_ids = ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/bin/app"], "WorkingDir": "/srv", "Env": ["A=1"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    files = {"config.json": json.dumps(config).encode()}
    for i, layer in enumerate(layers):
        files[f"l{i}/layer.tar"] = layer
    manifest = [
        {
            "Config": "config.json",
            "RepoTags": tags,
            "Layers": [f"l{i}/layer.tar" for i in range(len(layers))],
        }
    ]
    files["manifest.json"] = json.dumps(manifest).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return diff_ids


def test_docker_archive_shares_layers_and_remove_collects_them(tmp_path: Path) -> None:
    base = _tar([("etc/", "d", ""), ("etc/os", "f", "base")])
    top_a = _tar([("etc/", "d", ""), ("etc/.wh.os", "f", "")])
    top_b = _tar([("app", "f", "b")])
    store = ImageStore(tmp_path / "images")
    ids_a = _docker_archive(tmp_path / "a.tar", [base, top_a], ["app:a"])
    ids_b = _docker_archive(tmp_path / "b.tar", [base, top_b], ["app:b"])
    store.import_archive(tmp_path / "a.tar")
    store.import_archive(tmp_path / "b.tar")
    a = store.resolve("app:a")
    assert a.defaults.entrypoint == ["/bin/app"] and a.defaults.workdir == "/srv"
    assert a.layer_dirs[0] == store.resolve("app:b").layer_dirs[0]
    # Topmost layer first in lowerdir, as overlayfs wants.
    mount = store.overlay_mount(a, tmp_path / "c")
    assert mount.options[0] == f"lowerdir={a.layer_dirs[1]}:{a.layer_dirs[0]}"
    with pytest.raises(ImageError, match="used by a container"):
        store.remove("app:a", in_use={"docker.io/library/app:a"})
    store.remove("app:a", in_use=set())
    assert not store.layer_dir(ids_a[1]).exists()
    assert store.layer_dir(ids_b[0]).exists()  # still used by app:b
    with pytest.raises(ImageNotFound, match="pyshim image import"):
        store.resolve("app:a")


def test_layer_digest_mismatch_is_refused(tmp_path: Path) -> None:
    layer = _tar([("f", "f", "x")])
    _docker_archive(tmp_path / "a.tar", [layer], ["x:1"])
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    cfg = json.loads(members["config.json"])
    cfg["rootfs"]["diff_ids"] = ["sha256:" + "0" * 64]
    members["config.json"] = json.dumps(cfg).encode()
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    store = ImageStore(tmp_path / "images")
    with pytest.raises(ImageError, match="config says"):
        store.import_archive(tmp_path / "b.tar")
    assert store.list() == []
    assert not any(p.name.startswith(".tmp") for p in store.layers_dir.iterdir())


def test_not_an_image_archive(tmp_path: Path) -> None:
    (tmp_path / "x.tar").write_bytes(_tar([("hello", "f", "x")]))
    with pytest.raises(ImageError, match="neither"):
        ImageStore(tmp_path / "images").import_archive(tmp_path / "x.tar")
