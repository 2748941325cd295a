"""stats, top and logs --tail through the real CLI, pyshimd and shims."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.support.manager import PYSHIM, Manager, manager_session, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def manager() -> Iterator[Manager]:
    with manager_session() as m:
        yield m


def test_stats_no_stream_figures(manager: Manager) -> None:
    # Busy on one CPU, 16 MiB held in a tmpfs file, 2 processes.
    manager.ok(
        "run", "-d", "--name", "busy", "-m", "256m", "--", "sh", "-c",
        "dd if=/dev/zero of=/dev/shm/f bs=1M count=16 2>/dev/null;"
        " sleep 1000 & while :; do :; done",
    )  # fmt: skip
    manager.ok("run", "-d", "--name", "idle", "--", "sleep", "1000")
    wait_for(lambda: _stat(manager, "busy")["memory_usage"] >= 16 << 20)  # type: ignore[operator]
    rows = {r["name"]: r for r in json.loads(manager.ok("stats", "--no-stream", "--json"))}
    assert set(rows) == {"busy", "idle"}
    busy, idle = rows["busy"], rows["idle"]
    # The machine is shared and busy: only "some CPU" against "none" is certain.
    assert busy["cpu_percent"] > 0 and idle["cpu_percent"] < busy["cpu_percent"], (busy, idle)
    assert int(busy["cpu_usage_ns"]) > 0
    assert busy["memory_limit"] == str(256 << 20)  # uint64 is a string in proto JSON
    assert 0 < busy["memory_percent"] < 100
    assert int(busy["pids"]) == 2 and int(idle["pids"]) == 1
    assert int(busy["net_tx_bytes"]) >= 0 and "net_rx_bytes" in busy
    table = manager.ok("stats", "--no-stream", "idle")
    header, line = table.splitlines()
    assert header.split()[:3] == ["CONTAINER", "ID", "NAME"] and " idle " in line
    manager.ok("stop", "-t", "0", "idle")
    res = manager.cli("stats", "--no-stream", "idle")
    assert res.returncode == 125 and "not running" in res.stderr
    assert manager.cli("stats", "--no-stream", "ghost").returncode == 125
    assert manager.cli("stats", "--json").returncode == 2


def _stat(m: Manager, name: str) -> dict[str, object]:
    rows = json.loads(m.ok("stats", "--no-stream", "--json", name))
    return {k: int(v) if k == "memory_usage" else v for k, v in rows[0].items()}


def test_stats_net_io_counts_traffic(manager: Manager) -> None:
    manager.ok("run", "-d", "--name", "srv", "--", "sleep", "1000")
    ip = str(manager.inspect("srv")["ip_address"])
    before = _stat(manager, "srv")
    subprocess.run(["busybox", "ping", "-c", "3", "-s", "1000", ip], capture_output=True)
    after = _stat(manager, "srv")
    assert int(after["net_rx_bytes"]) - int(before["net_rx_bytes"]) >= 3000  # type: ignore[call-overload]
    assert int(after["net_tx_bytes"]) - int(before["net_tx_bytes"]) >= 3000  # type: ignore[call-overload]


def test_stats_live_streams_until_interrupted(manager: Manager) -> None:
    manager.ok("run", "-d", "--name", "live", "--", "sleep", "1000")
    proc = subprocess.Popen(
        [PYSHIM, "stats"], env=manager.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        headers = 0
        deadline = time.monotonic() + 30
        while headers < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            headers += line.startswith("CONTAINER ID")
        assert headers == 2
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_top_lists_the_container_processes(manager: Manager) -> None:
    manager.ok("run", "-d", "--name", "tp", "--", "sh", "-c", "sleep 1001 & sleep 1002 & wait")
    wait_for(lambda: len(json.loads(manager.ok("top", "--json", "tp"))) == 3)
    procs = json.loads(manager.ok("top", "--json", "tp"))
    init = int(manager.inspect("tp")["pid"])  # type: ignore[call-overload]
    commands = sorted(p["command"] for p in procs)
    assert commands == ["sh -c sleep 1001 & sleep 1002 & wait", "sleep 1001", "sleep 1002"]
    assert init in {p["pid"] for p in procs}
    assert {p["ppid"] for p in procs if p["command"].startswith("sleep")} == {init}
    assert all(p["user"] == "root" for p in procs)
    table = manager.ok("top", "tp")
    assert table.splitlines()[0].split() == ["PID", "PPID", "USER", "COMMAND"]
    manager.ok("stop", "-t", "0", "tp")
    res = manager.cli("top", "tp")
    assert res.returncode == 125 and "not running" in res.stderr


def test_logs_tail(manager: Manager) -> None:
    manager.ok("run", "--name", "lines", "--", "seq", "1", "10")
    assert manager.ok("logs", "--tail", "3", "lines") == "8\n9\n10\n"
    assert manager.ok("logs", "-n", "0", "lines") == ""
    assert manager.ok("logs", "--tail", "all", "lines") == "".join(f"{i}\n" for i in range(1, 11))
    res = manager.cli("logs", "--tail", "x", "lines")
    assert res.returncode == 2 and "invalid --tail" in res.stderr


USR1_PRINTS = (
    "trap 'echo second' USR1; trap 'echo third' USR2; echo first; while :; do sleep 0.1; done"
)


def _stamped(m: Manager, *args: str) -> list[tuple[int, str]]:
    """`logs -t` lines as (unix ns, text)."""
    out = []
    for line in m.ok("logs", "-t", *args).splitlines():
        stamp, _, text = line.partition(" ")
        when = datetime.datetime.fromisoformat(stamp[:26] + "+00:00")
        out.append((int(when.timestamp()) * 10**9 + int(stamp[20:29]), text))
    return out


def test_logs_timestamps_and_since(manager: Manager) -> None:
    cid = manager.ok("run", "-d", "--name", "ts", "--", "sh", "-c", USR1_PRINTS).strip()
    index = manager.state_dir / "containers" / cid / "ctr.log.idx"
    wait_for(lambda: index.exists() and index.read_text().startswith("6 "))  # "first\n"
    mid = time.time_ns()
    manager.ok("kill", "-s", "USR1", "ts")
    wait_for(lambda: manager.ok("logs", "ts") == "first\nsecond\n")
    wait_for(lambda: len(index.read_text().splitlines()) >= 2)
    (t1, l1), (t2, l2) = _stamped(manager, "ts")
    assert (l1, l2) == ("first", "second")
    assert t1 < mid < t2 <= time.time_ns()
    assert manager.ok("logs", "--since", f"{mid / 1e9:.9f}", "ts") == "second\n"
    assert manager.ok("logs", "--since", "1h", "ts") == "first\nsecond\n"
    assert manager.ok("logs", "--since", "2999-01-01T00:00:00Z", "ts") == ""
    assert [t for t, _ in _stamped(manager, "--tail", "1", "ts")] == [t2]

    # Written while pyshimd is down: stamped with the log's last write, not made up.
    manager.kill(signal.SIGKILL)
    down = time.time_ns()
    os.kill(int(json.loads(_record(manager, cid))["pid"]), signal.SIGUSR2)
    log = manager.state_dir / "containers" / cid / "ctr.log"
    wait_for(lambda: log.read_text().endswith("third\n"))
    manager.start()
    lines = _stamped(manager, "ts")
    assert [t for _, t in lines] == ["first", "second", "third"]
    assert down <= lines[2][0] <= time.time_ns()
    res = manager.cli("logs", "--since", "yesterday", "ts")
    assert res.returncode == 2 and "invalid --since" in res.stderr


def _record(m: Manager, cid: str) -> str:
    return (m.state_dir / "containers" / cid / "record.json").read_text()
