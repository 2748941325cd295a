"""stats, top and logs --tail through the real CLI, pyshimd and shims."""

from __future__ import annotations

import json
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
