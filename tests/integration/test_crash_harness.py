"""The crash-recovery harness (tests/crash) with a fixed seed against both drivers.

Each run builds its own daemon, tmpfs and image, runs a seeded workload with faults
(daemon and shim SIGKILL, SIGSTOP, full disk, killed clients, slow runc), and must end
with zero invariant violations; everything it started is stopped by PID and removed,
even when the run fails. Replay a failure with the printed command.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.crash.__main__ import run

pytestmark = pytest.mark.integration

PYSHIM = "io.containerd.pyshim.v1"
SEED = 20261128
# A few hundred operations over both runs; each stays within a couple of minutes.
OPS = 120
FAULTS = 40


def _require(driver: str) -> None:
    if os.geteuid() != 0:
        pytest.fail("the crash harness needs root")
    tools = ["runc", "mount"] + (["containerd", "ctr"] if driver == "containerd" else [])
    missing = [t for t in tools if shutil.which(t) is None]
    bindir = Path(sys.executable).parent
    for name in ("containerd-shim-pyshim-v1", "pyshim", "pyshimd"):
        if not (bindir / name).exists():
            missing.append(name)
    if missing:
        pytest.fail(f"missing for the crash harness: {', '.join(missing)}")


@pytest.mark.parametrize("driver", ["manager", "containerd"])
def test_no_violations_under_faults(driver: str) -> None:
    _require(driver)
    report = run(driver, PYSHIM, SEED, OPS, FAULTS)
    replay = (
        f"python -m tests.crash --driver {driver} --runtime {PYSHIM} --seed {SEED} "
        f"--ops {OPS} --faults {FAULTS} -v"
    )
    assert report.violations == [], f"{report.render()}\nreplay: {replay}"
    # The run must have exercised what it claims to.
    assert sum(report.faults.values()) == FAULTS
    assert report.exits_checked >= 20, report.render()
    assert report.daemon_restarts >= 1, report.render()
    # How long it took is reported, not asserted: CI's machine is busy (bench/ measures).
