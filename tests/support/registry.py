"""A real registry for pull tests: Debian's docker-registry (Distribution) on loopback,
with TLS from a CA made here, and either htpasswd (basic) auth or token auth through a
small token server in the test process (JWTs signed with openssl). Also a pusher.

Everything lives under a temp dir; the registry is stopped by PID.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import http.server
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import tarfile
import threading
import time
import urllib.parse
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.net import free_port

REGISTRY_BIN = "/usr/bin/docker-registry"
SERVICE = "pyshim-test"
ISSUER = "pyshim-test-issuer"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca_and_cert(d: Path) -> tuple[Path, Path, Path]:
    """(ca.crt, server.crt, server.key): a CA, and a cert for 127.0.0.1 signed by it."""
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = d / "ca.key", d / "ca.crt"
    key, csr, crt = d / "server.key", d / "server.csr", d / "server.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
             "-out", str(ca_crt), "-days", "2", "-subj", "/CN=pyshim test CA")  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", "/CN=127.0.0.1")  # fmt: skip
    ext = d / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(crt), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return ca_crt, crt, key


def _bcrypt(password: str) -> str:
    """htpasswd's bcrypt through libxcrypt (Debian 12's crypt(3)); no extra package."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Distribution's token auth: Basic credentials in, a signed JWT granting the
    scope out (x5c carries the signing cert, which the registry trusts)."""

    def __init__(self, d: Path, user: str, password: str) -> None:
        self.key, self.cert = d / "token.key", d / "token.crt"
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
                 "-out", str(self.cert), "-days", "2", "-subj", "/CN=token signer")  # fmt: skip
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
            check=True, capture_output=True,
        ).stdout  # fmt: skip
        self.x5c = base64.b64encode(der).decode()
        self.user, self.password = user, password
        self.port = free_port()
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                auth = self.headers.get("Authorization", "")
                want = base64.b64encode(f"{outer.user}:{outer.password}".encode()).decode()
                if auth != f"Basic {want}":
                    self.send_response(401)
                    self.end_headers()
                    return
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                body = json.dumps({"token": outer.sign(query.get("scope", []))}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def sign(self, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "x5c": [self.x5c]}
        claims = {
            "iss": ISSUER, "sub": self.user, "aud": SERVICE, "exp": now + 600,
            "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access,
        }  # fmt: skip
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        sig = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(), check=True, capture_output=True,
        ).stdout  # fmt: skip
        return signing_input + "." + _b64url(sig)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Registry:
    root: Path
    port: int
    ca: Path
    user: str
    password: str
    proc: subprocess.Popen[bytes]
    token: TokenServer | None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def blob_data_path(self, digest: str) -> Path:
        hexpart = digest.removeprefix("sha256:")
        return (
            self.root / "storage/docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"
        )

    def log(self) -> str:
        return (self.root / "registry.log").read_text(errors="replace")


@contextlib.contextmanager
def running_registry(root: Path, *, token_auth: bool = False) -> Iterator[Registry]:
    if not os.access(REGISTRY_BIN, os.X_OK):
        raise RuntimeError(f"{REGISTRY_BIN} missing: apt-get install docker-registry")
    root.mkdir(parents=True, exist_ok=True)
    ca, crt, key = make_ca_and_cert(root / "tls")
    user, password = "tester", secrets.token_hex(8)
    token = TokenServer(root / "tls", user, password) if token_auth else None
    port = free_port()
    if token is not None:
        auth = (f"  token:\n    realm: {token.realm}\n    service: {SERVICE}\n"
                f"    issuer: {ISSUER}\n    rootcertbundle: {token.cert}\n")  # fmt: skip
    else:
        htpasswd = root / "htpasswd"
        htpasswd.write_text(f"{user}:{_bcrypt(password)}\n")
        auth = f"  htpasswd:\n    realm: {SERVICE}\n    path: {htpasswd}\n"
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: info\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'storage'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {crt}\n    key: {key}\n"
        f"auth:\n{auth}"
    )
    logf = (root / "registry.log").open("wb")
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=logf, stderr=logf)
    logf.close()
    reg = Registry(root, port, ca, user, password, proc, token)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start:\n{reg.log()}")
            time.sleep(0.05)
        yield reg
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if token is not None:
            token.close()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------- pushing


class Pusher:
    """Just enough of the push side of the API (monolithic uploads) for tests."""

    def __init__(self, reg: Registry) -> None:
        self.reg = reg
        self.ctx = ssl.create_default_context(cafile=str(reg.ca))
        self._auth = ""

    def _request(
        self, method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        hdrs = dict(headers or {})
        for _ in range(2):
            if self._auth:
                hdrs["Authorization"] = self._auth
            conn = http.client.HTTPSConnection(self.reg.host, context=self.ctx, timeout=30)
            conn.request(method, url, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            if resp.status != 401:
                return resp.status, dict(resp.getheaders()), data
            self._auth = self._login(resp.getheader("WWW-Authenticate", ""))
        raise RuntimeError(f"push: still 401 for {method} {url}")

    def _login(self, challenge: str) -> str:
        basic = base64.b64encode(f"{self.reg.user}:{self.reg.password}".encode()).decode()
        if challenge.startswith("Basic"):
            return f"Basic {basic}"
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        assert self.reg.token is not None
        query = urllib.parse.urlencode({"service": params["service"], "scope": params["scope"]})
        conn = http.client.HTTPConnection("127.0.0.1", self.reg.token.port, timeout=30)
        conn.request("GET", f"/token?{query}", headers={"Authorization": f"Basic {basic}"})
        token = json.loads(conn.getresponse().read())["token"]
        conn.close()
        return f"Bearer {token}"

    def blob(self, repo: str, data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        status, headers, _ = self._request("POST", f"/v2/{repo}/blobs/uploads/")
        assert status == 202, status
        location = urllib.parse.urlsplit(headers["Location"])
        sep = "&" if location.query else ""
        url = f"{location.path}?{location.query}{sep}digest={digest}"
        status, _, body = self._request(
            "PUT", url, data, {"Content-Type": "application/octet-stream"}
        )
        assert status == 201, (status, body)
        return {"digest": digest, "size": len(data)}

    def manifest(self, repo: str, tag: str, doc: dict[str, Any]) -> str:
        data = json.dumps(doc).encode()
        status, _, body = self._request(
            "PUT", f"/v2/{repo}/manifests/{tag}", data, {"Content-Type": doc["mediaType"]}
        )
        assert status == 201, (status, body)
        return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ArchiveImage:
    config: bytes
    layers: list[bytes]


def read_oci_archive(path: Path) -> ArchiveImage:
    """Config and layer blobs of the single image in an OCI layout tar."""
    with tarfile.open(path) as tar:

        def blob(digest: str) -> bytes:
            f = tar.extractfile("blobs/sha256/" + digest.removeprefix("sha256:"))
            assert f is not None
            return f.read()

        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        return ArchiveImage(
            config=blob(manifest["config"]["digest"]),
            layers=[blob(layer["digest"]) for layer in manifest["layers"]],
        )
