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

import os
from pathlib import Path

from crashtest.containerd import (
    DEBIAN,
    HOST_BINARIES,
    ContainerdError,
    Host,
    bin_dir_in,
    binary_version,
    unpack_release,
)

__all__ = ["DEBIAN", "Containerd2NotFound", "Host", "in_ci", "locate"]

ENV = "PYSHIM_CONTAINERD2_DIR"
TARBALL_NAME = "containerd-2.3.4-linux-amd64.tar.xz"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TARBALL = REPO_ROOT.parent / "shared" / "containerd" / TARBALL_NAME
BINARIES = HOST_BINARIES
# What `containerd --version` must mention (the config written for it is 2.x's).
VERSION_PREFIX = "v2."

MISSING_HELP = (
    f"containerd 2.3 was not found: set {ENV} to a directory holding containerd 2.3's "
    f"{', '.join(BINARIES)} (directly or in bin/), e.g. an unpacked {TARBALL_NAME}, "
    f"or put that tarball at {DEFAULT_TARBALL}"
)


class Containerd2NotFound(Exception):
    """No containerd 2.3 here; the message says how to provide one."""


def _check_version(bin_dir: Path) -> None:
    out = binary_version(bin_dir / "containerd")
    if f" {VERSION_PREFIX}" not in out:
        raise Containerd2NotFound(
            f"{bin_dir / 'containerd'} is not containerd 2.x ({out!r}); {MISSING_HELP}"
        )


def locate(cache: Path) -> Host:
    """containerd 2.3 from ``$PYSHIM_CONTAINERD2_DIR`` or the shared tarball."""
    named = os.environ.get(ENV)
    if named:
        bin_dir = bin_dir_in(Path(named))
        if bin_dir is None:
            raise Containerd2NotFound(
                f"{ENV}={named} holds no {', '.join(BINARIES)} (nor bin/ with them); "
                + MISSING_HELP
            )
    elif DEFAULT_TARBALL.is_file():
        try:
            bin_dir = unpack_release(DEFAULT_TARBALL, cache)
        except ContainerdError as exc:
            raise Containerd2NotFound(f"{exc}; {MISSING_HELP}") from None
    else:
        raise Containerd2NotFound(MISSING_HELP)
    _check_version(bin_dir)
    return Host("2.3", bin_dir)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
