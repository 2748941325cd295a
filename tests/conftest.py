"""Shared fixtures: a private containerd per test and the busybox image."""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.support.containerd import Containerd
from tests.support.containerd2 import DEBIAN
from tests.support.hosts import require

BUSYBOX_REF = "docker.io/library/busybox:latest"
REQUIRED_BINARIES = ("runc", "containerd", "ctr")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        # A test's own containerd, or the one inside a fixture's node (CRI's CriNode).
        for value in getattr(item, "funcargs", {}).values():
            ctrd = value if isinstance(value, Containerd) else getattr(value, "containerd", None)
            if isinstance(ctrd, Containerd):
                report.sections.append(
                    (f"containerd log tail ({ctrd.log_path})", ctrd.log_tail(120))
                )
    return report


@pytest.fixture(scope="session")
def integration_env() -> None:
    """Integration prerequisites; a missing one fails the test, never skips it."""
    problems = []
    if os.geteuid() != 0:
        problems.append("integration tests must run as root")
    problems += [f"{b} not found on PATH" for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture(autouse=True)
def _integration_prereqs(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("integration") is not None:
        request.getfixturevalue("integration_env")


@pytest.fixture(scope="session")
def containerd2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the shared containerd 2.3 tarball is unpacked, once per session."""
    return tmp_path_factory.mktemp("containerd2")


@pytest.fixture
def containerd(request: pytest.FixtureRequest, integration_env: None) -> Iterator[Containerd]:
    """A containerd of this test's own (own dirs, sockets and namespace), stopped by PID.

    Indirectly parametrized with a host name ("1.6", "2.3"), it is that containerd.
    """
    name = getattr(request, "param", DEBIAN.name)
    host = require(name, request.getfixturevalue("containerd2_cache"))
    ctrd = Containerd(host=host)
    try:
        yield ctrd
    finally:
        ctrd.close()


@pytest.fixture(scope="session")
def busybox_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from crashtest.images import build_busybox_oci_archive

    return build_busybox_oci_archive(
        tmp_path_factory.mktemp("images") / "busybox-oci.tar", ref=BUSYBOX_REF
    )


@pytest.fixture
def busybox_image(containerd: Containerd, busybox_archive: Path) -> str:
    """The busybox image imported (and unpacked) into this test's containerd."""
    containerd.ctr("images", "import", str(busybox_archive), timeout=120)
    names = containerd.ctr("images", "ls", "-q").stdout.split()
    if BUSYBOX_REF not in names:
        pytest.fail(f"{BUSYBOX_REF} missing after import; images: {names}", pytrace=False)
    return BUSYBOX_REF
