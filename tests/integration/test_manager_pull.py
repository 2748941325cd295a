"""`pyshim pull` and `login` against a real registry (Debian's docker-registry) on
loopback, with TLS from a CA made by the test and basic or token auth; images pushed by
the test from the busybox archive the other tests import."""

from __future__ import annotations

import gzip
import hashlib
import json
import platform
import shutil
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from crashtest.images import build_busybox_oci_archive
from tests.support.manager import PYSHIM, Manager, manager_session
from tests.support.registry import Pusher, Registry, read_oci_archive, running_registry

pytestmark = pytest.mark.integration

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
OTHER_ARCH = "s390x" if ARCH != "s390x" else "amd64"


@pytest.fixture
def manager() -> Iterator[Manager]:
    with manager_session() as m:
        yield m


def _config(base: bytes, arch: str, cmd: list[str]) -> bytes:
    cfg = json.loads(base)
    cfg["architecture"] = arch
    cfg["config"]["Cmd"] = cmd
    return json.dumps(cfg).encode()


def _push_images(m: Manager, reg: Registry) -> dict[str, str]:
    """tools/bb:oci, :docker, :multi (an index listing another platform first).
    Returns tag -> manifest digest."""
    image = read_oci_archive(build_busybox_oci_archive(m.root / "bb.tar"))
    p = Pusher(reg)
    repo = "tools/bb"
    layers = [p.blob(repo, layer) for layer in image.layers]

    def manifest(media: str, config: bytes, config_media: str, layer_media: str) -> dict[str, Any]:
        return {
            "schemaVersion": 2,
            "mediaType": media,
            "config": {"mediaType": config_media, **p.blob(repo, config)},
            "layers": [{"mediaType": layer_media, **d} for d in layers],
        }

    oci = manifest(
        OCI_MANIFEST,
        _config(image.config, ARCH, ["echo", "right platform"]),
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.oci.image.layer.v1.tar+gzip",
    )
    docker = manifest(
        DOCKER_MANIFEST,
        _config(image.config, ARCH, ["echo", "docker types"]),
        "application/vnd.docker.container.image.v1+json",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    )
    other = manifest(
        OCI_MANIFEST,
        _config(image.config, OTHER_ARCH, ["echo", "wrong platform"]),
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.oci.image.layer.v1.tar+gzip",
    )
    digests = {"oci": p.manifest(repo, "oci", oci), "docker": p.manifest(repo, "docker", docker)}
    other_digest = p.manifest(repo, "other", other)

    def desc(doc: dict[str, Any], digest: str, arch: str) -> dict[str, Any]:
        size = len(json.dumps(doc).encode())
        return {"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                "platform": {"os": "linux", "architecture": arch}}  # fmt: skip

    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [desc(other, other_digest, OTHER_ARCH), desc(oci, digests["oci"], ARCH)],
    }
    p.manifest(repo, "multi", index)
    digests["multi"] = digests["oci"]
    return digests


def _trust(m: Manager, reg: Registry) -> None:
    d = m.certs_dir / reg.host
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(reg.ca, d / "ca.crt")


def _login(m: Manager, reg: Registry) -> None:
    out = m.ok("login", reg.host, "-u", reg.user, "--password-stdin", input=reg.password.encode())
    assert out == "Login Succeeded\n"


def test_pull_tls_basic_auth_media_types_and_platforms(manager: Manager) -> None:
    with running_registry(manager.root / "reg") as reg:
        digests = _push_images(manager, reg)
        ref = f"{reg.host}/tools/bb"
        res = manager.cli("pull", f"{ref}:oci")
        assert res.returncode == 125 and "certificate not trusted" in res.stderr, res.stderr
        _trust(manager, reg)
        res = manager.cli("pull", f"{ref}:oci")
        assert res.returncode == 125 and f"pyshim login {reg.host}" in res.stderr, res.stderr
        bad = manager.cli("login", reg.host, "-u", reg.user, "-p", "wrong")
        assert bad.returncode == 125 and "access denied" in bad.stderr, bad.stderr
        _login(manager, reg)
        assert (manager.state_dir / "auth.json").stat().st_mode & 0o077 == 0

        for tag in ("oci", "docker", "multi"):
            out = manager.ok("pull", f"{ref}:{tag}")
            assert out == f"{ref}:{tag} {digests[tag]}\n", (tag, out)
        listed = manager.ok("image", "ls")
        assert all(f"{ref}:{tag}" in listed for tag in ("oci", "docker", "multi"))
        for tag, said in (
            ("oci", "right platform"),
            ("docker", "docker types"),
            ("multi", "right platform"),
        ):
            res = manager.cli("run", "--rm", f"{ref}:{tag}")
            assert (res.returncode, res.stdout) == (0, f"{said}\n"), (tag, res.stderr)
        # Pulled blobs are unpacked, then not kept; nothing partial is left.
        blobs = manager.state_dir / "images" / "blobs" / "sha256"
        assert list(blobs.iterdir()) == []

        # run pulls what is missing (a digest reference this time).
        res = manager.cli("run", "--rm", f"{ref}@{digests['docker']}", "--", "echo", "ran")
        assert res.returncode == 0 and res.stdout.endswith("ran\n"), res.stderr
        assert "Unable to find image" in res.stderr
        for bad_ref, want in (
            (f"{ref}:nope", "not found"),
            ("UPPER/case", "invalid image reference"),
            (f"{ref}@sha256:1234", "invalid digest"),
        ):
            res = manager.cli("pull", bad_ref)
            assert res.returncode == 125 and want in res.stderr, (bad_ref, res.stderr)


def test_wrong_digest_is_refused_and_nothing_kept(manager: Manager) -> None:
    with running_registry(manager.root / "reg") as reg:
        _push_images(manager, reg)
        _trust(manager, reg)
        _login(manager, reg)
        layer = read_oci_archive(manager.root / "bb.tar").layers[0]
        digest = "sha256:" + hashlib.sha256(layer).hexdigest()
        data = reg.blob_data_path(digest)
        # Same size, different bytes: only a digest check can tell.
        corrupt = gzip.compress(b"\0" * 10)
        data.write_bytes(corrupt + b"\0" * (len(layer) - len(corrupt)))
        res = manager.cli("pull", f"{reg.host}/tools/bb:oci")
        assert res.returncode == 125 and f"blob {digest}: content is" in res.stderr, res.stderr
        assert "refused and deleted" in res.stderr
        images = manager.state_dir / "images"
        assert list((images / "blobs" / "sha256").iterdir()) == []
        assert not (images / "layers").exists() or list((images / "layers").iterdir()) == []
        assert "tools/bb" not in manager.ok("image", "ls")


def test_interrupted_download_resumes(manager: Manager) -> None:
    with running_registry(manager.root / "reg") as reg:
        _push_images(manager, reg)
        _trust(manager, reg)
        _login(manager, reg)
        layer = read_oci_archive(manager.root / "bb.tar").layers[0]
        hexpart = hashlib.sha256(layer).hexdigest()
        blobs = manager.state_dir / "images" / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        # What a pull stopped half-way leaves.
        (blobs / f"{hexpart}.partial").write_bytes(layer[: len(layer) // 2])
        manager.ok("pull", f"{reg.host}/tools/bb:oci")
        assert f"blob sha256:{hexpart}: resuming at byte {len(layer) // 2}" in manager.daemon_log()
        res = manager.cli("run", "--rm", f"{reg.host}/tools/bb:oci")
        assert (res.returncode, res.stdout) == (0, "right platform\n"), res.stderr
        assert list(blobs.iterdir()) == []


def test_token_auth(manager: Manager) -> None:
    with running_registry(manager.root / "reg", token_auth=True) as reg:
        _push_images(manager, reg)
        _trust(manager, reg)
        res = manager.cli("pull", f"{reg.host}/tools/bb:oci")
        assert res.returncode == 125 and "token server" in res.stderr, res.stderr
        _login(manager, reg)
        assert reg.token is not None
        seen = len(reg.token.requests)
        manager.ok("pull", f"{reg.host}/tools/bb:multi")
        scopes = [r for r in reg.token.requests[seen:] if "scope=repository" in r]
        assert scopes and all("tools%2Fbb%3Apull" in r for r in scopes), reg.token.requests
        res = manager.cli("run", "--rm", f"{reg.host}/tools/bb:multi")
        assert (res.returncode, res.stdout) == (0, "right platform\n"), res.stderr


def test_progress_bars_on_a_terminal(manager: Manager) -> None:
    from ptyprocess import PtyProcess

    with running_registry(manager.root / "reg") as reg:
        _push_images(manager, reg)
        _trust(manager, reg)
        _login(manager, reg)
        layer = read_oci_archive(manager.root / "bb.tar").layers[0]
        short = hashlib.sha256(layer).hexdigest()[:12]
        proc = PtyProcess.spawn([PYSHIM, "pull", f"{reg.host}/tools/bb:oci"], env=manager.env)
        out = b""
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                try:
                    out += proc.read(4096)
                except EOFError:
                    break
            proc.wait()
        finally:
            if proc.isalive():
                proc.kill(signal.SIGKILL)
        text = out.decode(errors="replace")
        assert proc.exitstatus == 0, text
        assert f"{short}: " in text, text  # the layer's line, redrawn in place
        assert text.rstrip().splitlines()[-1].startswith(f"{reg.host}/tools/bb:oci sha256:")
        # Not on a terminal: just the result.
        assert manager.ok("pull", f"{reg.host}/tools/bb:oci").count("\n") == 1
