"""The crash tool (crashtest/, `pyshim-crashtest`) with a fixed seed against both drivers.

Each run goes through the command's own main(), as `pyshim-crashtest` would: it builds
its own daemon, tmpfs and image, runs a seeded workload with faults (daemon and shim
SIGKILL, SIGSTOP, full disk, killed clients, slow runc), and must end with zero
invariant violations; everything it started is stopped by PID and removed, even when
the run fails. Replay a failure with the printed command.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from crashtest.cli import main
from crashtest.report import text
from crashtest.result import Report

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
    for name in ("containerd-shim-pyshim-v1", "pyshim", "pyshimd", "pyshim-crashtest"):
        if not (bindir / name).exists():
            missing.append(name)
    if missing:
        pytest.fail(f"missing for the crash harness: {', '.join(missing)}")


@pytest.mark.parametrize("driver", ["manager", "containerd"])
def test_no_violations_under_faults(driver: str, tmp_path: Path) -> None:
    _require(driver)
    result = tmp_path / "result.json"
    argv = ["--driver", driver, "--runtime", PYSHIM, "--seed", str(SEED)]
    argv += ["--ops", str(OPS), "--faults", str(FAULTS), "--json", str(result)]
    status = main(argv)
    assert result.exists(), f"pyshim-crashtest {' '.join(argv)} exited {status}, no result"
    report = Report.loads(result.read_text())
    replay = f"pyshim-crashtest {' '.join(argv[:-2])} -v"
    assert report.violations == [], f"{text(report)}\nreplay: {replay}"
    assert status == 0
    # The run must have exercised what it claims to.
    assert sum(report.faults.values()) == FAULTS
    assert report.exits_checked >= 20, text(report)
    assert report.daemon_restarts >= 1, text(report)
    assert len(report.timeline) == report.steps
    # How long it took is reported, not asserted: CI's machine is busy (bench/ measures).
