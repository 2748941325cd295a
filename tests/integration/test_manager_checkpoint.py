"""`pyshim checkpoint` and `pyshim start --checkpoint` through the real CLI and pyshimd.

On this host CRIU cannot dump, so pyshimd is given the recording stand-in for runc
(`pyshimd --runc-binary`, tests/support/recording_runc.py): it fakes checkpoint and
restore and runs everything else with the real runc. What is checked here is the CLI's
and pyshimd's part (requests, states, records, errors); CRIU's own part runs in the VM
tier (tests/guest/test_checkpoint.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.manager import Manager, manager_session, wait_for
from tests.support.recording_runc import RecordingRunc, install

pytestmark = pytest.mark.integration

COUNTER = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.2; done"


@pytest.fixture
def runc(tmp_path: Path) -> RecordingRunc:
    return install(tmp_path / "standin")


@pytest.fixture
def manager(runc: RecordingRunc) -> Iterator[Manager]:
    with manager_session(["--runc-binary", str(runc.path)]) as m:
        yield m


def _run_counter(m: Manager, name: str) -> None:
    m.ok("run", "-d", "--name", name, "--network", "none", "--", "sh", "-c", COUNTER)
    wait_for(lambda: len(m.ok("logs", name).splitlines()) >= 2)


def test_checkpoint_then_start_from_it(
    manager: Manager, runc: RecordingRunc, tmp_path: Path
) -> None:
    _run_counter(manager, "cnt")
    info = manager.inspect("cnt")
    bundle, cid = str(info["bundle"]), str(info["id"])

    kept = tmp_path / "kept"
    assert manager.ok("checkpoint", "--leave-running", "-o", str(kept), "cnt") == f"{kept}\n"
    assert manager.inspect("cnt")["status"] == "running"
    (first,) = runc.commands("checkpoint")
    assert first[first.index("checkpoint") :] == [
        "checkpoint", "--image-path", str(kept), "--work-path", f"{bundle}/work/criu-work",
        "--leave-running", cid,
    ]  # fmt: skip

    # An output that holds something already is refused; nothing reaches runc.
    again = manager.cli("checkpoint", "-o", str(kept), "cnt")
    assert again.returncode == 125
    assert f"--output {kept}: exists and is not an empty directory" in again.stderr
    assert len(runc.commands("checkpoint")) == 1

    # Without --leave-running the container stops as CRIU kills it, and stays stopped.
    out = tmp_path / "out"
    manager.ok("checkpoint", "--output", str(out), "cnt")
    info = manager.inspect("cnt")
    assert (info["status"], info["exit_status"]) == ("stopped", 137)
    assert info["exit_reason"] == f"checkpointed to {out}"
    assert "--leave-running" not in runc.commands("checkpoint")[-1]

    old_pid = info["pid"]
    assert manager.ok("start", "--checkpoint", str(out), "cnt") == "cnt\n"
    info = manager.inspect("cnt")
    assert (info["id"], info["status"], info["exited"]) == (cid, "running", False)
    assert info["pid"] not in (0, old_pid)
    (restore,) = runc.commands("restore")
    assert restore[restore.index("restore") :] == [
        "restore", "--image-path", str(out), "--work-path", f"{bundle}/work", "--detach",
        "--pid-file", f"{bundle}/init.pid", "-no-subreaper", "--bundle", bundle, cid,
    ]  # fmt: skip
    # The restored init is any init to pyshimd: exec, stop.
    assert manager.ok("exec", "cnt", "--", "echo", "inside") == "inside\n"
    manager.ok("kill", "cnt")
    wait_for(lambda: manager.inspect("cnt")["status"] == "stopped")

    # A container with a terminal: CRIU is told to take its pty (--shell-job).
    manager.ok("run", "-d", "-t", "--name", "tty", "--network", "none", "--", "sh", "-c", COUNTER)
    manager.ok("checkpoint", "--leave-running", "-o", str(tmp_path / "tty"), "tty")
    tty_line = runc.commands("checkpoint")[-1]
    assert "--shell-job" in tty_line and "--shell-job" not in first, tty_line


def test_checkpoint_and_start_errors(manager: Manager, runc: RecordingRunc, tmp_path: Path) -> None:
    helped = manager.cli("checkpoint", "--help")
    assert helped.returncode == 0 and "--leave-running" in helped.stdout, helped.stdout
    assert "--checkpoint DIR" in manager.ok("start", "--help")
    missing = manager.cli("checkpoint", "cnt")
    assert missing.returncode == 2 and "--output" in missing.stderr
    unknown = manager.cli("checkpoint", "-o", str(tmp_path / "x"), "nosuch")
    assert unknown.returncode == 125 and "no such container: nosuch" in unknown.stderr

    _run_counter(manager, "cnt")
    two = manager.cli("start", "--checkpoint", str(tmp_path), "cnt", "other")
    assert two.returncode == 2 and "one container" in two.stderr

    # A failed checkpoint: runc's error with CRIU's log, the container runs on, and the
    # output pyshimd made is gone again.
    runc.fail_checkpoints("criu failed: type DUMP errno 0\n")
    failed = manager.cli("checkpoint", "-o", str(tmp_path / "failed"), "cnt")
    bundle = manager.inspect("cnt")["bundle"]
    assert failed.returncode == 125
    assert "cannot checkpoint cnt: " in failed.stderr
    assert f"criu failed: type DUMP errno 0 path= {bundle}/criu-dump.log" in failed.stderr
    assert manager.inspect("cnt")["status"] == "running"
    assert not (tmp_path / "failed").exists()
    runc.fail_checkpoints(None)

    manager.ok("kill", "cnt")
    wait_for(lambda: manager.inspect("cnt")["status"] == "stopped")
    stopped = manager.cli("checkpoint", "-o", str(tmp_path / "y"), "cnt")
    assert stopped.returncode == 125 and "container cnt is not running" in stopped.stderr

    for bad, why in (
        (tmp_path / "nowhere", "not a directory"),
        (tmp_path, "no checkpoint there (CRIU's inventory.img is missing"),
    ):
        res = manager.cli("start", "--checkpoint", str(bad), "cnt")
        assert res.returncode == 125 and why in res.stderr, res.stderr
        assert manager.inspect("cnt")["status"] == "stopped"
    assert runc.commands("restore") == []
