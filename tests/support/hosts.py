"""The containerd matrix of the integration tests: Debian's 1.6 and containerd 2.3."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.containerd2 import DEBIAN, Containerd2NotFound, Host, in_ci, locate

HOST_NAMES = ("1.6", "2.3")

# For the tests that matter for host compatibility: run them on both containerds
# (the `containerd` fixture of tests/conftest.py takes the name).
every_host = pytest.mark.parametrize("containerd", HOST_NAMES, indirect=True)


def require(name: str, cache: Path) -> Host:
    """The host called ``name``; a containerd 2.3 that cannot be found ends the test:
    a failure in CI (CI=true), else a skip saying how to provide it."""
    if name == DEBIAN.name:
        return DEBIAN
    try:
        return locate(cache)
    except Containerd2NotFound as exc:
        if in_ci():
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))
