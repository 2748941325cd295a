"""Local images: import OCI-layout and docker-archive tars, unpack each layer once, and
hand containers an overlay of shared layer directories.

Layers are stored in overlayfs' own format (a whiteout is a 0/0 character device, an
opaque directory carries ``trusted.overlay.opaque=y``), so the kernel applies whiteouts
when the layers are stacked and no layer is ever copied per container.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import json
import os
import platform
import posixpath
import shutil
import stat
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgspec

from manager.records import write_atomic
from manager.spec import ImageDefaults
from protocol.proto.types import mount_pb2

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
INDEX_VERSION = 1
MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}


class ImageError(Exception):
    pass


class ImageNotFound(ImageError):
    pass


class ImageEntry(msgspec.Struct, kw_only=True):
    ref: str
    digest: str
    layers: list[str]  # diff ids, lowest first
    config: dict[str, Any]
    size: int = 0


class ImageIndex(msgspec.Struct, kw_only=True):
    version: int = INDEX_VERSION
    images: dict[str, ImageEntry] = msgspec.field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedImage:
    ref: str
    layer_dirs: list[Path]  # lowest first
    defaults: ImageDefaults
    stop_signal: str = ""  # the image's StopSignal ("" = SIGTERM)


def normalize_ref(ref: str) -> str:
    """docker's short forms: ``busybox`` -> ``docker.io/library/busybox:latest``."""
    if not ref or ref != ref.strip() or any(ch.isspace() for ch in ref):
        raise ImageError(f"invalid image reference {ref!r}")
    name, digest_sep, digest = ref.partition("@")
    last = name.rsplit("/", 1)[-1]
    if ":" not in last and not digest_sep:
        name += ":latest"
    first, slash, _ = name.partition("/")
    if not slash:
        name = "docker.io/library/" + name
    elif "." not in first and ":" not in first and first != "localhost":
        name = "docker.io/" + name
    return name + (digest_sep + digest if digest_sep else "")


def pick_platform(index: dict[str, Any], where: str) -> dict[str, Any]:
    """The descriptor for this machine (linux/<arch>) in an index or manifest list."""
    for m in index.get("manifests", []):
        platform_ = m.get("platform", {})
        if (
            platform_.get("os", "linux") == "linux"
            and platform_.get("architecture", _oci_arch()) == _oci_arch()
        ):
            return dict(m)
    found = sorted(
        f"{m.get('platform', {}).get('os')}/{m.get('platform', {}).get('architecture')}"
        for m in index.get("manifests", [])
    )
    raise ImageError(f"no manifest for linux/{_oci_arch()} in {where} (has: {', '.join(found)})")


def _oci_arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
        machine, machine
    )


# ---------------------------------------------------------------------- layer unpack


def _safe_relpath(name: str) -> str:
    """The member's path inside the layer; refuses anything that would leave it."""
    norm = posixpath.normpath(name.lstrip("/"))
    if norm == ".":
        return ""
    if norm == ".." or norm.startswith("../"):
        raise ImageError(f"layer entry {name!r} escapes the layer")
    return norm


def _inside(root: Path, path: Path) -> bool:
    real = os.path.realpath(path)
    base = os.path.realpath(root)
    return real == base or real.startswith(base + os.sep)


def _remove_existing(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# Every member is checked above, so tarfile's own filter must not second-guess it;
# naming "fully_trusted" keeps newer Pythons from warning. Older 3.11 patch
# releases (Debian 12's 3.11.2) have no `filter` argument and never filter.
_NO_FILTER: dict[str, Any] = (
    {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
)


def unpack_layer(fileobj: IO[bytes], dest: Path) -> None:
    """Extract one layer tar (plain or gzip) into ``dest`` in overlayfs whiteout format."""
    dest.mkdir(parents=True, exist_ok=True)
    dir_attrs: list[tuple[Path, tarfile.TarInfo]] = []
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            rel = _safe_relpath(member.name)
            if not rel:
                continue
            target = dest / rel
            if not _inside(dest, target.parent):
                raise ImageError(f"layer entry {member.name!r} goes through a symlink")
            base = posixpath.basename(rel)
            if base == OPAQUE_WHITEOUT:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.setxattr(target.parent, OPAQUE_XATTR, b"y")
                continue
            if base.startswith(WHITEOUT_PREFIX):
                hidden = target.parent / base.removeprefix(WHITEOUT_PREFIX)
                hidden.parent.mkdir(parents=True, exist_ok=True)
                _remove_existing(hidden)
                os.mknod(hidden, stat.S_IFCHR | 0o000, os.makedev(0, 0))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if member.islnk():
                link_rel = _safe_relpath(member.linkname)
                if not _inside(dest, dest / link_rel):
                    raise ImageError(f"hard link {member.name!r} points outside the layer")
                member.linkname = link_rel
            if member.isdir():
                if target.exists() and not target.is_dir():
                    _remove_existing(target)
                target.mkdir(exist_ok=True)
                # Applied last: a read-only directory must still receive its entries.
                dir_attrs.append((target, member))
                continue
            if target.exists() or target.is_symlink():
                _remove_existing(target)
            member.name = rel
            tar.extract(member, dest, set_attrs=True, numeric_owner=True, **_NO_FILTER)
    for path, member in reversed(dir_attrs):
        os.chown(path, member.uid, member.gid)
        os.chmod(path, member.mode & 0o7777)
        os.utime(path, (member.mtime, member.mtime))


class _DigestReader(io.RawIOBase):
    """Hashes what the decompressor reads: the layer's diff id comes for free."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self._raw.read(len(buf))
        self.hash.update(data)
        n = len(data)
        buf[:n] = data
        return n


def _open_uncompressed(raw: IO[bytes]) -> IO[bytes]:
    head = raw.read(2)
    raw.seek(0)
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def _open_binary(path: Path) -> IO[bytes]:
    return path.open("rb")


def _dir_size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


# ---------------------------------------------------------------------- archives


@dataclass
class _Archive:
    tar: tarfile.TarFile

    def read(self, name: str) -> bytes:
        try:
            f = self.tar.extractfile(name)
        except KeyError:
            f = None
        if f is None:
            raise ImageError(f"archive has no {name}")
        return f.read()

    def open(self, name: str) -> IO[bytes]:
        f = self.tar.extractfile(name)
        if f is None:
            raise ImageError(f"archive has no {name}")
        return f

    def has(self, name: str) -> bool:
        try:
            self.tar.getmember(name)
        except KeyError:
            return False
        return True


@dataclass(frozen=True)
class _Found:
    ref: str
    digest: str
    config: dict[str, Any]
    layer_blobs: list[str]  # archive member names, lowest first
    diff_ids: list[str]


def _blob_name(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or not hexpart:
        raise ImageError(f"unsupported digest {digest!r}")
    return f"blobs/sha256/{hexpart}"


def _pick_manifest(archive: _Archive, desc: dict[str, Any]) -> dict[str, Any]:
    """Follow nested indexes to the manifest for this machine."""
    for _ in range(8):
        media = desc.get("mediaType", "")
        body = json.loads(archive.read(_blob_name(desc["digest"])))
        if media in INDEX_TYPES or "manifests" in body:
            desc = pick_platform(body, "the archive")
            continue
        if media and media not in MANIFEST_TYPES:
            raise ImageError(f"unsupported manifest type {media}")
        body["_digest"] = desc["digest"]
        return dict(body)
    raise ImageError("image index nested too deeply")


def _read_oci(archive: _Archive, ref_hint: str) -> list[_Found]:
    index = json.loads(archive.read("index.json"))
    found: list[_Found] = []
    for desc in index.get("manifests", []):
        ann = desc.get("annotations", {})
        ref = ann.get("io.containerd.image.name") or ref_hint
        if not ref:
            tag = ann.get("org.opencontainers.image.ref.name", "")
            if tag and ("/" in tag or ":" in tag):
                ref = tag
        if not ref:
            raise ImageError("the archive does not name its image: give one with --ref NAME")
        manifest = _pick_manifest(archive, desc)
        config = json.loads(archive.read(_blob_name(manifest["config"]["digest"])))
        layers = [_blob_name(layer["digest"]) for layer in manifest.get("layers", [])]
        found.append(
            _Found(
                ref=normalize_ref(ref),
                digest=manifest["_digest"],
                config=config,
                layer_blobs=layers,
                diff_ids=list(config.get("rootfs", {}).get("diff_ids", [])),
            )
        )
    return found


def _read_docker(archive: _Archive, ref_hint: str) -> list[_Found]:
    entries = json.loads(archive.read("manifest.json"))
    found: list[_Found] = []
    for entry in entries:
        config_bytes = archive.read(entry["Config"])
        config = json.loads(config_bytes)
        refs = list(entry.get("RepoTags") or []) or ([ref_hint] if ref_hint else [])
        if not refs:
            raise ImageError("the archive does not name its image: give one with --ref NAME")
        digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        for ref in refs:
            found.append(
                _Found(
                    ref=normalize_ref(ref),
                    digest=digest,
                    config=config,
                    layer_blobs=list(entry["Layers"]),
                    diff_ids=list(config.get("rootfs", {}).get("diff_ids", [])),
                )
            )
    return found


# ---------------------------------------------------------------------- the store


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.layers_dir = root / "layers"
        self.index_path = root / "index.json"

    def _load(self) -> ImageIndex:
        try:
            data = self.index_path.read_bytes()
        except FileNotFoundError:
            return ImageIndex()
        return msgspec.json.decode(data, type=ImageIndex)

    def _save(self, index: ImageIndex) -> None:
        write_atomic(self.index_path, msgspec.json.encode(index))

    def layer_dir(self, diff_id: str) -> Path:
        algo, _, hexpart = diff_id.partition(":")
        if algo != "sha256" or len(hexpart) != 64:
            raise ImageError(f"unsupported layer id {diff_id!r}")
        return self.layers_dir / hexpart

    def _unpack(
        self, open_blob: Callable[[], IO[bytes]], blob: str, expected: str | None
    ) -> tuple[str, int]:
        """Unpack one layer unless already present; returns (diff id, unpacked bytes)."""
        if expected:
            done = self.layer_dir(expected)
            if done.is_dir():
                return expected, _dir_size(done)
        self.layers_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.layers_dir / f".tmp-{uuid.uuid4().hex}"
        try:
            reader = _DigestReader(_open_uncompressed(open_blob()))
            unpack_layer(io.BufferedReader(reader), tmp)
            # tarfile stops at the end-of-archive marker; the diff id covers the padding.
            while reader.read(65536):
                pass
            diff_id = "sha256:" + reader.hash.hexdigest()
            if expected and diff_id != expected:
                raise ImageError(f"layer {blob}: content is {diff_id}, config says {expected}")
            final = self.layer_dir(diff_id)
            if final.is_dir():
                shutil.rmtree(tmp)
            else:
                os.rename(tmp, final)
            return diff_id, _dir_size(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def import_archive(self, path: Path, ref_hint: str = "") -> list[ImageEntry]:
        try:
            tar = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed by the with below
        except (OSError, tarfile.TarError) as exc:
            raise ImageError(f"cannot read image archive {path}: {exc}") from exc
        with tar:
            archive = _Archive(tar)
            if archive.has("index.json") and archive.has("oci-layout"):
                found = _read_oci(archive, ref_hint)
            elif archive.has("manifest.json"):
                found = _read_docker(archive, ref_hint)
            else:
                raise ImageError(f"{path} is neither an OCI image layout nor a docker-archive tar")
            imported: list[ImageEntry] = []
            for image in found:
                if image.diff_ids and len(image.diff_ids) != len(image.layer_blobs):
                    raise ImageError(f"{image.ref}: config and manifest disagree on layers")
                diff_ids: list[str] = []
                size = 0
                for i, blob in enumerate(image.layer_blobs):
                    expected = image.diff_ids[i] if image.diff_ids else None
                    diff_id, layer_size = self._unpack(
                        functools.partial(archive.open, blob), blob, expected
                    )
                    diff_ids.append(diff_id)
                    size += layer_size
                imported.append(
                    ImageEntry(
                        ref=image.ref,
                        digest=image.digest,
                        layers=diff_ids,
                        config=image.config,
                        size=size,
                    )
                )
        self._add(imported)
        return imported

    def _add(self, entries: list[ImageEntry]) -> None:
        index = self._load()
        for entry in entries:
            index.images[entry.ref] = entry
        self._save(index)

    def add_pulled(
        self, ref: str, digest: str, config: dict[str, Any], layer_files: list[Path]
    ) -> ImageEntry:
        """An image whose blobs a pull verified and left in files: unpack and name it."""
        diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
        if diff_ids and len(diff_ids) != len(layer_files):
            raise ImageError(f"{ref}: config and manifest disagree on layers")
        layers: list[str] = []
        size = 0
        for i, path in enumerate(layer_files):
            expected = diff_ids[i] if diff_ids else None
            diff_id, layer_size = self._unpack(
                functools.partial(_open_binary, path), path.name, expected
            )
            layers.append(diff_id)
            size += layer_size
        entry = ImageEntry(ref=ref, digest=digest, layers=layers, config=config, size=size)
        self._add([entry])
        return entry

    def list(self) -> list[ImageEntry]:
        return sorted(self._load().images.values(), key=lambda e: e.ref)

    def get(self, ref: str) -> ImageEntry:
        images = self._load().images
        entry = images.get(ref)
        if entry is None:
            with contextlib.suppress(ImageError):
                entry = images.get(normalize_ref(ref))
        if entry is None:
            raise ImageNotFound(
                f"image {ref!r} not found: `pyshim pull` it or `pyshim image import ARCHIVE`"
            )
        return entry

    def resolve(self, ref: str) -> ResolvedImage:
        entry = self.get(ref)
        dirs = [self.layer_dir(d) for d in entry.layers]
        for d in dirs:
            if not d.is_dir():
                raise ImageError(f"image {entry.ref}: layer {d.name} is missing; import it again")
        cfg = entry.config.get("config") or {}
        return ResolvedImage(
            ref=entry.ref,
            layer_dirs=dirs,
            defaults=ImageDefaults(
                entrypoint=list(cfg.get("Entrypoint") or []),
                cmd=list(cfg.get("Cmd") or []),
                env=list(cfg.get("Env") or []),
                workdir=cfg.get("WorkingDir") or "",
                user=cfg.get("User") or "",
            ),
            stop_signal=cfg.get("StopSignal") or "",
        )

    def overlay_mount(self, image: ResolvedImage, scratch: Path) -> mount_pb2.Mount:
        """The container's root: shared read-only layers under its own upper/work dirs."""
        if not image.layer_dirs:
            raise ImageError(f"image {image.ref} has no layers")
        upper = scratch / "upper"
        work = scratch / "work"
        upper.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        lower = ":".join(str(d) for d in reversed(image.layer_dirs))
        return mount_pb2.Mount(
            type="overlay",
            source="overlay",
            options=[f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}"],
        )

    def remove(self, ref: str, in_use: set[str]) -> ImageEntry:
        index = self._load()
        entry = self.get(ref)
        if entry.ref in in_use:
            raise ImageError(
                f"image {entry.ref} is used by a container; remove the container first"
            )
        del index.images[entry.ref]
        self._save(index)
        still_used = {d for e in index.images.values() for d in e.layers}
        for diff_id in entry.layers:
            if diff_id not in still_used:
                shutil.rmtree(self.layer_dir(diff_id), ignore_errors=True)
        return entry

    def layer_dirs_in_use(self) -> Iterator[Path]:
        for entry in self._load().images.values():
            for d in entry.layers:
                yield self.layer_dir(d)
