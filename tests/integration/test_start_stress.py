"""Many `start`s at once on a busy machine: every one succeeds, nothing is left.

Under load the template's spare could take its hand-over's connection reset for
"start is gone" and remove the socket whose address `start` had just printed
(containerd then failed to dial it: 0.5% of starts). These rounds are what showed it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.containerd import Containerd

pytestmark = pytest.mark.integration

RUNTIME = "io.containerd.pyshim.v1"
ROUNDS = 15
AT_ONCE = 40  # 600 starts in all


@pytest.fixture
def cpu_hogs() -> Iterator[None]:
    """Two busy loops (one per core here), stopped by pid."""
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
        for _ in range(2)
    ]
    try:
        yield
    finally:
        for hog in hogs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hog.pid, signal.SIGKILL)
            hog.wait()


def wait_until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def _socket_of(ctrd: Containerd, cid: str) -> Path:
    address = (ctrd.bundle(cid) / "address").read_text().strip()
    return Path(address.removeprefix("unix://"))


def _round(ctrd: Containerd, image: str, prefix: str) -> list[str]:
    """AT_ONCE `ctr run -d` at once, then all removed; the failures, in ctr's words."""
    cids = [f"{prefix}-{i}" for i in range(AT_ONCE)]

    def run(cid: str) -> subprocess.CompletedProcess[str]:
        argv = ["run", "-d", "--runtime", RUNTIME, image, cid, "sleep", "600"]
        return ctrd.ctr(*argv, check=False, timeout=180)

    with ThreadPoolExecutor(AT_ONCE) as pool:
        results = list(pool.map(run, cids))
    failures = [f"{cid}: {r.stderr.strip()}" for cid, r in zip(cids, results, strict=True)
                if r.returncode != 0]  # fmt: skip
    sockets = [_socket_of(ctrd, cid) for cid, r in zip(cids, results, strict=True)
               if r.returncode == 0]  # fmt: skip

    def remove(cid: str) -> None:
        ctrd.ctr("task", "kill", "-s", "SIGKILL", cid, check=False, timeout=60)
        ctrd.ctr("task", "delete", "-f", cid, check=False, timeout=60)
        ctrd.ctr("container", "delete", cid, check=False, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(remove, cids))
    wait_until("every shim to exit", lambda: ctrd.shim_pids() == [])
    failures += [f"socket {s} left" for s in sockets if s.exists()]
    return failures


def test_many_starts_at_once_under_load(
    containerd: Containerd, busybox_image: str, cpu_hogs: None
) -> None:
    failures: list[str] = []
    for n in range(ROUNDS):
        failures += _round(containerd, busybox_image, f"r{n}")
    assert not failures, f"{len(failures)} of {ROUNDS * AT_ONCE} starts: {failures[:10]}"


def test_two_containerds_share_one_template(busybox_archive: Path, cpu_hogs: None) -> None:
    # Each containerd's shims hand their starts to the one template of this install.
    shared = Path(tempfile.mkdtemp(prefix="pyshim-shared-template-", dir="/tmp"))
    shared.chmod(0o700)
    pair: list[Containerd] = []
    try:
        pair += [Containerd(template_dir=shared / "t"), Containerd(template_dir=shared / "t")]
        image = "docker.io/library/busybox:latest"
        for ctrd in pair:
            ctrd.ctr("images", "import", str(busybox_archive), timeout=120)
        failures: list[str] = []
        for n in range(3):
            with ThreadPoolExecutor(2) as pool:
                rounds = list(pool.map(_round, pair, [image] * 2, [f"s{n}"] * 2))
            failures += [f for r in rounds for f in r]
        assert not failures, failures[:10]
        templates = {pid for ctrd in pair for pid in ctrd.template_pids()}
        assert len(templates) == 1, templates
    finally:
        for ctrd in pair:
            ctrd.close()
        subprocess.run(["rm", "-rf", str(shared)], check=False)
