"""stop/start/restart/pause, restart policies (also across pyshimd restarts and crashes)
and OOMKilled, through the real pyshim CLI, pyshimd, shims and runc."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.manager import Manager, manager_session, wait_for

pytestmark = pytest.mark.integration

# pid 1 of a pid namespace ignores signals it has no handler for.
TRAPS_TERM = "trap 'echo term; exit 0' TERM; echo up; while true; do sleep 0.1; done"
IGNORES_TERM = "echo up; while true; do sleep 0.1; done"


@pytest.fixture
def manager() -> Iterator[Manager]:
    with manager_session() as m:
        yield m


def _field(m: Manager, ref: str, key: str) -> object:
    return m.inspect(ref)[key]


def _logs(m: Manager, ref: str) -> list[str]:
    return m.ok("logs", ref).splitlines()


def test_stop_start_restart_keep_id_and_log(manager: Manager) -> None:
    cid = manager.ok("run", "-d", "--name", "svc", "--", "sh", "-c", TRAPS_TERM).strip()
    wait_for(lambda: _logs(manager, "svc") == ["up"])
    assert manager.ok("stop", "svc").strip() == "svc"
    info = manager.inspect("svc")
    assert (info["status"], info["exit_status"]) == ("stopped", 0)
    assert _logs(manager, "svc") == ["up", "term"]
    first_pid = info["pid"]

    assert manager.ok("start", "svc").strip() == "svc"
    info = manager.inspect("svc")
    assert (info["id"], info["status"], info["exited"]) == (cid, "running", False)
    assert info["pid"] != first_pid
    wait_for(lambda: _logs(manager, "svc") == ["up", "term", "up"])
    again = manager.cli("start", "svc")
    assert again.returncode == 125 and "already running" in again.stderr

    manager.ok("restart", "svc")
    wait_for(lambda: _logs(manager, "svc") == ["up", "term", "up", "term", "up"])
    assert _field(manager, "svc", "status") == "running"
    # exec and wait work on the new run.
    assert manager.ok("exec", "svc", "--", "echo", "hi") == "hi\n"
    manager.ok("kill", "-s", "TERM", "svc")
    assert manager.ok("wait", "svc").strip() == "0"


def test_stop_timeout_then_sigkill_and_stop_signal(manager: Manager) -> None:
    manager.ok("run", "-d", "--name", "deaf", "--", "sh", "-c", IGNORES_TERM)
    wait_for(lambda: _logs(manager, "deaf") == ["up"])
    t0 = time.monotonic()
    manager.ok("stop", "-t", "1", "deaf")
    took = time.monotonic() - t0
    assert _field(manager, "deaf", "exit_status") == 137
    assert 1.0 <= took < 30, took  # at least the grace; a busy CI machine adds to it

    manager.ok(
        "run", "-d", "--name", "usr1", "--stop-signal", "USR1", "--", "sh", "-c",
        "trap 'echo usr1; exit 9' USR1; echo up; while true; do sleep 0.1; done",
    )  # fmt: skip
    wait_for(lambda: _logs(manager, "usr1") == ["up"])
    manager.ok("stop", "usr1")
    assert _field(manager, "usr1", "exit_status") == 9
    assert _logs(manager, "usr1") == ["up", "usr1"]
    # Stopping a stopped container is fine (docker's too).
    manager.ok("stop", "usr1")


def test_pause_and_unpause(manager: Manager) -> None:
    manager.ok("run", "-d", "--name", "frz", "--", "sleep", "1000")
    manager.ok("pause", "frz")
    ps = json.loads(manager.ok("ps", "--json"))
    assert [c["status"] for c in ps] == ["paused"]
    pid = int(ps[0]["pid"])
    # The frozen process sleeps in the freezer (D or S state, never running).
    state = Path(f"/proc/{pid}/status").read_text()
    assert "State:\tR" not in state
    assert manager.cli("pause", "frz").stderr.strip().endswith("is not running")
    manager.ok("unpause", "frz")
    assert _field(manager, "frz", "status") == "running"
    bad = manager.cli("unpause", "frz")
    assert bad.returncode == 125 and "not paused" in bad.stderr
    # stop of a paused container thaws it so it can die.
    manager.ok("pause", "frz")
    manager.ok("stop", "-t", "1", "frz")
    assert _field(manager, "frz", "exit_status") == 137


def test_on_failure_restarts_up_to_n(manager: Manager) -> None:
    manager.ok(
        "run", "-d", "--name", "flaky", "--restart", "on-failure:2", "--",
        "sh", "-c", "echo run; exit 3",
    )  # fmt: skip
    wait_for(lambda: _logs(manager, "flaky") == ["run"] * 3 and _stopped(manager, "flaky"))
    info = manager.inspect("flaky")
    assert (info["restart_count"], info["restart_policy"], info["exit_status"]) == (
        2,
        "on-failure:2",
        3,
    )
    # A success is not a failure: on-failure leaves it alone.
    manager.ok("run", "-d", "--name", "fine", "--restart", "on-failure", "--", "true")
    wait_for(lambda: _stopped(manager, "fine"))
    assert _field(manager, "fine", "restart_count") == 0


def _stopped(m: Manager, ref: str) -> bool:
    return m.inspect(ref)["status"] == "stopped"


def test_always_restarts_with_backoff_until_stopped(manager: Manager) -> None:
    manager.ok("run", "-d", "--name", "loop", "--restart", "always", "--", "sh", "-c", "exit 0")
    wait_for(lambda: int(_field(manager, "loop", "restart_count")) >= 3)  # type: ignore[call-overload]
    listed = manager.ok("ps", "--all")
    assert "loop" in listed
    manager.ok("stop", "loop")
    count = _field(manager, "loop", "restart_count")
    assert _field(manager, "loop", "status") == "stopped"
    # Back-off has grown past 0.4 s by the 3rd restart; a stopped one stays stopped.
    time.sleep(1.0)
    assert _field(manager, "loop", "restart_count") == count
    assert _field(manager, "loop", "status") == "stopped"
    log = manager.daemon_log()
    assert "restarting in 0.1s" in log and "restarting in 0.4s" in log


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "crashed"])
def test_exit_while_pyshimd_is_down_is_restarted(manager: Manager, how: int) -> None:
    manager.ok("run", "-d", "--name", "r1", "--restart", "on-failure", "--", "sleep", "1000")
    manager.ok("run", "-d", "--name", "keep", "--restart", "unless-stopped", "--", "sleep", "1000")
    manager.ok("run", "-d", "--name", "back", "--restart", "always", "--", "sleep", "1000")
    manager.ok("stop", "-t", "0", "keep")
    manager.ok("stop", "-t", "0", "back")
    pid = int(_field(manager, "r1", "pid"))  # type: ignore[call-overload]
    manager.kill(how)
    os.kill(pid, signal.SIGKILL)  # exits (137) while nobody is listening
    manager.start()
    wait_for(lambda: _field(manager, "r1", "restart_count") == 1)
    wait_for(lambda: _field(manager, "r1", "status") == "running")
    info = manager.inspect("r1")
    assert info["restart_policy"] == "on-failure" and int(info["pid"]) != pid  # type: ignore[call-overload]
    # docker's rules at daemon start: always comes back, unless-stopped stays stopped.
    wait_for(lambda: _field(manager, "back", "status") == "running")
    assert _field(manager, "keep", "status") == "stopped"
    assert manager.ok("exec", "r1", "--", "echo", "ok") == "ok\n"


def test_oom_killed_shows_in_inspect_and_ps(manager: Manager) -> None:
    res = manager.cli("run", "--name", "hog", "-m", "32m", "--", "tail", "/dev/zero")
    assert res.returncode == 137, res.stderr
    wait_for(lambda: _field(manager, "hog", "oom_killed") is True)
    assert "OOMKilled" in manager.ok("ps", "--all")
    # A plain kill is not an OOM kill.
    manager.ok("run", "-d", "--name", "plain", "-m", "32m", "--", "sleep", "1000")
    manager.ok("kill", "plain")
    manager.ok("wait", "plain")
    assert _field(manager, "plain", "oom_killed") is False


def test_bad_input_is_refused_clearly(manager: Manager) -> None:
    for args, want in (
        (["run", "--restart", "sometimes", "--", "true"], "invalid restart policy"),
        (["run", "--restart", "on-failure:x", "--", "true"], "invalid restart policy"),
        (["run", "--rm", "--restart", "always", "--", "true"], "cannot be combined"),
        (["run", "-m", "12q", "--", "true"], "invalid size"),
        (["stop", "-t", "soon", "x"], "invalid timeout"),
    ):
        res = manager.cli(*args)
        assert res.returncode == 2 and want in res.stderr, (args, res.stderr)
    for cmd in ("stop", "start", "restart", "pause", "unpause"):
        res = manager.cli(cmd, "ghost")
        assert res.returncode == 125 and "no such container: ghost" in res.stderr, res.stderr
        assert manager.cli(cmd, "--help").returncode == 0
    res = manager.cli("run", "--stop-signal", "SIGNOPE", "--", "true")
    assert res.returncode == 125 and "unknown signal" in res.stderr, res.stderr
    assert "512m" in manager.ok("run", "--help")
