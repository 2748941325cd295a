"""Pulling from an OCI distribution (registry v2) API: auth challenges (Basic and
Bearer tokens), manifest lists / indexes picked for this platform, OCI and Docker media
types, every blob verified by its digest, downloads resumed from where they stopped.

Blocking (http.client): pyshimd runs a pull in a worker thread and reads ``Progress``
from its loop. Blobs land in ``<images>/blobs/sha256/<hex>`` only once verified; a
download in flight is ``<hex>.partial`` and is resumed with a Range request.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import os
import re
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manager.images import INDEX_TYPES, MANIFEST_TYPES, ImageError, normalize_ref, pick_platform

log = logging.getLogger("pyshimd")
ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
DOCKER_HUB = "registry-1.docker.io"
TIMEOUT = 30.0
CHUNK = 1 << 16
MAX_REDIRECTS = 5
MAX_MANIFEST = 4 << 20
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


class RegistryError(ImageError):
    pass


@dataclass(frozen=True)
class Reference:
    host: str  # where to connect (docker.io -> registry-1.docker.io)
    repository: str
    reference: str  # tag or digest
    name: str  # normalized, as the image store names it

    @classmethod
    def parse(cls, ref: str) -> Reference:
        name = normalize_ref(ref)
        path, at, digest = name.partition("@")
        registry, _, rest = path.partition("/")
        if at:
            repo, tag = rest, digest
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                raise RegistryError(f"invalid digest in {ref!r}")
        else:
            repo, _, tag = rest.rpartition(":")
        if not re.fullmatch(r"[a-z0-9]+(?:[._/-]+[a-z0-9]+)*", repo) or not tag:
            raise RegistryError(f"invalid image reference {ref!r}")
        host = DOCKER_HUB if registry == "docker.io" else registry
        return cls(host=host, repository=repo, reference=tag, name=name)


@dataclass
class LayerProgress:
    digest: str
    size: int
    done: int = 0
    state: str = "waiting"  # waiting, downloading, verified, exists, unpacking, done


@dataclass
class Progress:
    """What a pull has done so far; written by the pulling thread, read by the API."""

    ref: str
    layers: list[LayerProgress] = field(default_factory=list)
    finished: bool = False
    error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


class RegistryClient:
    def __init__(
        self,
        host: str,
        *,
        certs_dir: Path | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.host = host
        self._creds = credentials
        self._ctx = ssl.create_default_context()
        if certs_dir is not None:
            # docker's certs.d layout: <dir>/<host[:port]>/*.crt are extra CAs.
            for ca in sorted((certs_dir / host).glob("*.crt")):
                self._ctx.load_verify_locations(cafile=str(ca))
        self._auth: str | None = None  # the Authorization header that worked last

    # -------------------------------------------------------------- transport

    def _connect(self, netloc: str, scheme: str) -> http.client.HTTPConnection:
        if scheme == "http":
            return http.client.HTTPConnection(netloc, timeout=TIMEOUT)
        return http.client.HTTPSConnection(netloc, timeout=TIMEOUT, context=self._ctx)

    def _open(
        self, method: str, path: str, headers: dict[str, str], *, retry_auth: bool = True
    ) -> http.client.HTTPResponse:
        url = urllib.parse.urlsplit(f"https://{self.host}{path}")
        hdrs = dict(headers)
        if self._auth:
            hdrs["Authorization"] = self._auth
        for _ in range(MAX_REDIRECTS):
            conn = self._connect(url.netloc, url.scheme)
            target = url.path + (f"?{url.query}" if url.query else "")
            try:
                conn.request(method, target, headers=hdrs)
                resp = conn.getresponse()
            except ssl.SSLCertVerificationError as exc:
                raise RegistryError(
                    f"{url.netloc}: TLS certificate not trusted ({exc.verify_message}); "
                    f"put its CA in the certs dir as {url.netloc}/ca.crt"
                ) from None
            except OSError as exc:
                raise RegistryError(f"{url.netloc}: {exc}") from None
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location", "")
                resp.read()
                conn.close()
                new = urllib.parse.urlsplit(urllib.parse.urljoin(url.geturl(), location))
                if new.netloc != url.netloc:
                    # Blob storage elsewhere (a CDN) gets no registry credentials.
                    hdrs.pop("Authorization", None)
                url = new
                continue
            if resp.status == 401 and retry_auth:
                challenge = resp.getheader("WWW-Authenticate", "")
                resp.read()
                conn.close()
                self._auth = self._answer(challenge)
                return self._open(method, path, headers, retry_auth=False)
            return resp
        raise RegistryError(f"{self.host}: too many redirects")

    def _answer(self, challenge: str) -> str:
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() == "basic":
            if self._creds is None:
                raise RegistryError(f"{self.host} wants a login: pyshim login {self.host} -u USER")
            return "Basic " + _basic(self._creds)
        if scheme.lower() != "bearer":
            raise RegistryError(f"{self.host}: unsupported auth challenge {challenge!r}")
        p = dict(_CHALLENGE.findall(params))
        realm = p.get("realm", "")
        if not realm:
            raise RegistryError(f"{self.host}: bearer challenge without a realm")
        query = {k: p[k] for k in ("service", "scope") if k in p}
        url = urllib.parse.urlsplit(realm + ("?" + urllib.parse.urlencode(query)))
        conn = self._connect(url.netloc, url.scheme)
        hdrs = {"Authorization": "Basic " + _basic(self._creds)} if self._creds else {}
        try:
            conn.request("GET", url.path + "?" + url.query, headers=hdrs)
            resp = conn.getresponse()
            body = resp.read()
        except OSError as exc:
            raise RegistryError(f"token server {url.netloc}: {exc}") from None
        finally:
            conn.close()
        if resp.status != 200:
            raise RegistryError(
                f"token server {url.netloc} refused ({resp.status}): "
                + ("wrong user or password" if self._creds else f"pyshim login {self.host}")
            )
        data = json.loads(body)
        token = data.get("token") or data.get("access_token")
        if not token:
            raise RegistryError(f"token server {url.netloc} gave no token")
        return f"Bearer {token}"

    def _error(self, resp: http.client.HTTPResponse, what: str) -> RegistryError:
        body = resp.read(64 << 10)
        try:
            errors = json.loads(body).get("errors", [])
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
        except (ValueError, AttributeError):
            detail = body.decode(errors="replace")[:200]
        if resp.status == 404:
            return RegistryError(f"{what}: not found on {self.host}")
        if resp.status in (401, 403):
            return RegistryError(f"{what}: access denied by {self.host} ({detail})")
        return RegistryError(f"{what}: {self.host} answered {resp.status} {detail}")

    # -------------------------------------------------------------- API

    def check(self) -> None:
        """The registry answers /v2/ with our credentials (what a login verifies)."""
        resp = self._open("GET", "/v2/", {})
        if resp.status != 200:
            raise self._error(resp, "login")
        resp.read()

    def manifest(self, repo: str, reference: str) -> tuple[str, bytes, str]:
        """(media type, body, digest); the body's digest is checked when asked by one."""
        what = f"{self.host}/{repo}:{reference}"
        resp = self._open("GET", f"/v2/{repo}/manifests/{reference}", {"Accept": ACCEPT})
        if resp.status != 200:
            raise self._error(resp, what)
        body = resp.read(MAX_MANIFEST + 1)
        if len(body) > MAX_MANIFEST:
            raise RegistryError(f"{what}: manifest larger than {MAX_MANIFEST} bytes")
        media = (resp.getheader("Content-Type") or "").split(";")[0].strip()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(f"{what}: manifest content is {digest}")
        if not media or media not in MANIFEST_TYPES | INDEX_TYPES:
            media = json.loads(body).get("mediaType", media)
        return media, body, digest

    def blob(self, repo: str, digest: str, dest: Path, layer: LayerProgress | None) -> Path:
        """``dest`` holds the blob once verified; resumes ``dest.partial``."""
        if dest.exists():
            if layer is not None:
                layer.state, layer.done = "exists", layer.size
            return dest
        partial = dest.with_name(dest.name + ".partial")
        have = partial.stat().st_size if partial.exists() else 0
        if have:
            log.info("blob %s: resuming at byte %d", digest, have)
        headers = {"Range": f"bytes={have}-"} if have else {}
        resp = self._open("GET", f"/v2/{repo}/blobs/{digest}", headers)
        if resp.status == 200:
            have = 0  # the server ignored Range: start over
        elif resp.status != 206:
            raise self._error(resp, f"blob {digest}")
        hasher = hashlib.sha256()
        if have:
            with partial.open("rb") as f:
                while chunk := f.read(CHUNK):
                    hasher.update(chunk)
        if layer is not None:
            layer.state, layer.done = "downloading", have
        with partial.open("ab" if have else "wb") as out:
            while chunk := resp.read(CHUNK):
                out.write(chunk)
                hasher.update(chunk)
                if layer is not None:
                    layer.done += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        got = "sha256:" + hasher.hexdigest()
        if got != digest:
            partial.unlink()
            raise RegistryError(f"blob {digest}: content is {got}; refused and deleted")
        os.rename(partial, dest)
        if layer is not None:
            layer.state = "verified"
        return dest


def _basic(creds: Credentials | None) -> str:
    assert creds is not None
    return base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()


def resolve_manifest(client: RegistryClient, ref: Reference) -> tuple[str, dict[str, Any]]:
    """(manifest digest, manifest) for this platform, through any index."""
    reference = ref.reference
    for _ in range(4):
        media, body, digest = client.manifest(ref.repository, reference)
        doc = json.loads(body)
        if media in INDEX_TYPES or "manifests" in doc:
            reference = pick_platform(doc, f"{ref.name}'s index")["digest"]
            continue
        if media not in MANIFEST_TYPES:
            raise RegistryError(f"{ref.name}: unsupported manifest type {media!r}")
        return digest, doc
    raise RegistryError(f"{ref.name}: image index nested too deeply")


def pull(
    ref: Reference,
    blobs_dir: Path,
    progress: Progress,
    *,
    certs_dir: Path | None,
    credentials: Credentials | None,
) -> tuple[str, dict[str, Any], list[Path]]:
    """Fetch and verify the manifest, config and layers: (digest, config, layer files)."""
    client = RegistryClient(ref.host, certs_dir=certs_dir, credentials=credentials)
    digest, manifest = resolve_manifest(client, ref)
    blobs_dir.mkdir(parents=True, exist_ok=True)
    layers = manifest.get("layers", [])
    with progress.lock:
        progress.layers = [
            LayerProgress(digest=d["digest"], size=int(d.get("size", 0))) for d in layers
        ]
    config_desc = manifest["config"]
    config_path = client.blob(
        ref.repository, config_desc["digest"], blobs_dir / _hex(config_desc["digest"]), None
    )
    config = json.loads(config_path.read_bytes())
    config_path.unlink()
    files = [
        client.blob(ref.repository, d["digest"], blobs_dir / _hex(d["digest"]), lp)
        for d, lp in zip(layers, progress.layers, strict=True)
    ]
    return digest, config, files


def _hex(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexpart):
        raise RegistryError(f"unsupported digest {digest!r}")
    return hexpart
