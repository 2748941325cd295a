"""Which containerd a test runs: Debian's 1.6 from PATH, or containerd 2.3.

containerd 2.3 is not packaged anywhere this project can install from. Tests
(and bench/) find it, in this order:

1. ``$PYSHIM_CONTAINERD2_DIR``: a directory holding ``containerd``, ``ctr`` and
   ``containerd-shim-runc-v2`` (directly or in ``bin/``), e.g. an unpacked
   containerd 2.3 release tarball;
2. ``../shared/containerd/containerd-2.3.4-linux-amd64.tar.xz`` beside the
   repository, unpacked once into a cache directory the caller owns.

Nothing is ever copied into the repository.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

ENV = "PYSHIM_CONTAINERD2_DIR"
TARBALL_NAME = "containerd-2.3.4-linux-amd64.tar.xz"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TARBALL = REPO_ROOT.parent / "shared" / "containerd" / TARBALL_NAME
BINARIES = ("containerd", "ctr", "containerd-shim-runc-v2")
# What `containerd --version` must mention (the config written for it is 2.x's).
VERSION_PREFIX = "v2."

MISSING_HELP = (
    f"containerd 2.3 was not found: set {ENV} to a directory holding containerd 2.3's "
    f"{', '.join(BINARIES)} (directly or in bin/), e.g. an unpacked {TARBALL_NAME}, "
    f"or put that tarball at {DEFAULT_TARBALL}"
)


class Containerd2NotFound(Exception):
    """No containerd 2.3 here; the message says how to provide one."""


@dataclass(frozen=True)
class Host:
    """A containerd to run: its name (the test id) and where its binaries are.

    ``bin_dir`` None means containerd and ctr from PATH (Debian's 1.6).
    """

    name: str
    bin_dir: Path | None = None

    @property
    def v2(self) -> bool:
        return not self.name.startswith("1.")

    @property
    def containerd(self) -> str:
        return str(self.bin_dir / "containerd") if self.bin_dir else "containerd"

    @property
    def ctr(self) -> str:
        return str(self.bin_dir / "ctr") if self.bin_dir else "ctr"

    @property
    def go_shim(self) -> str:
        """containerd-shim-runc-v2 of this containerd (PATH for Debian's)."""
        return str(self.bin_dir / BINARIES[2]) if self.bin_dir else BINARIES[2]


DEBIAN = Host("1.6")


def _bin_dir_in(directory: Path) -> Path | None:
    for candidate in (directory, directory / "bin"):
        if all(os.access(candidate / b, os.X_OK) for b in BINARIES):
            return candidate
    return None


def _check_version(bin_dir: Path) -> None:
    try:
        out = subprocess.run(
            [str(bin_dir / "containerd"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except OSError as exc:
        raise Containerd2NotFound(f"{bin_dir / 'containerd'}: {exc}; {MISSING_HELP}") from None
    if f" {VERSION_PREFIX}" not in out:
        raise Containerd2NotFound(
            f"{bin_dir / 'containerd'} is not containerd 2.x ({out.strip()!r}); {MISSING_HELP}"
        )


def _unpack(tarball: Path, cache: Path) -> Path:
    """The tarball's bin/ unpacked under ``cache`` (once: a finished unpack is reused)."""
    stat = tarball.stat()
    dest = cache / f"{TARBALL_NAME.removesuffix('.tar.xz')}-{stat.st_size}-{int(stat.st_mtime)}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(str(dest) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions unpacking at once
        found = _bin_dir_in(dest)
        if found is not None:
            return found
        partial = Path(str(dest) + ".partial")
        with contextlib.suppress(FileNotFoundError):
            for p in sorted(partial.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                p.rmdir() if p.is_dir() else p.unlink()
            partial.rmdir()
        partial.mkdir()
        with tarfile.open(tarball, "r:xz") as tar:
            # Plain files and directories inside the destination only (Debian's 3.11.2
            # predates extractall's filter=).
            members = [
                m
                for m in tar.getmembers()
                if (m.isfile() or m.isdir())
                and not m.name.startswith("/")
                and ".." not in Path(m.name).parts
            ]
            tar.extractall(partial, members=members)
        partial.rename(dest)
    found = _bin_dir_in(dest)
    if found is None:
        raise Containerd2NotFound(f"{tarball} holds no {', '.join(BINARIES)}; {MISSING_HELP}")
    return found


def locate(cache: Path) -> Host:
    """containerd 2.3 from ``$PYSHIM_CONTAINERD2_DIR`` or the shared tarball."""
    named = os.environ.get(ENV)
    if named:
        bin_dir = _bin_dir_in(Path(named))
        if bin_dir is None:
            raise Containerd2NotFound(
                f"{ENV}={named} holds no {', '.join(BINARIES)} (nor bin/ with them); "
                + MISSING_HELP
            )
    elif DEFAULT_TARBALL.is_file():
        bin_dir = _unpack(DEFAULT_TARBALL, cache)
    else:
        raise Containerd2NotFound(MISSING_HELP)
    _check_version(bin_dir)
    return Host("2.3", bin_dir)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
