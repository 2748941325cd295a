"""The shim template under systemd: what a node operator sees (issue 25).

containerd runs as a systemd service (KillMode=process, as Debian's unit has it), so
every shim it starts, the template and its spare included, lives in the service's
cgroup. Shims that serve containers stay there across `systemctl restart containerd`,
as the Go shim's do. The template and its spare leave once no daemon they made is
alive and no start came for PYSHIM_TEMPLATE_IDLE seconds, so a node whose containers
are gone keeps no pyshim process and its restart finds nothing left over. VM tier only.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crashtest.containerd import START_TIMEOUT
from shim.boot.template import IDLE_ENV, TEMPLATE_COMM
from tests.guest.test_cgroup_v2 import CGROUP_ROOT
from tests.integration.test_stats_oom import PYSHIM, task_status, wait_until
from tests.support.containerd import Containerd
from tests.support.cri import BUSYBOX_REF

pytestmark = pytest.mark.integration

# Seconds: longer than a start takes in a slow guest (the template spawned by the
# first start must still be there for the second).
IDLE = 20


def templates(ctrd: Containerd) -> list[int]:
    """The template itself: under UML its forked daemons keep its command line
    (README, Known limits), not its name."""
    found = []
    for pid in ctrd.template_pids():
        try:
            if Path(f"/proc/{pid}/comm").read_bytes() == TEMPLATE_COMM + b"\n":
                found.append(pid)
        except OSError:
            continue
    return found


def describe(pids: list[int]) -> list[str]:
    """What each process is (for a failure's message)."""
    out = []
    for pid in pids:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        out.append(f"{pid} {comm}: {cmdline[:160]}")
    return out


@pytest.fixture(autouse=True)
def _systemd() -> None:
    if not Path("/run/systemd/system").is_dir():
        pytest.fail("needs systemd: run through scripts/vm.sh test")


class Service:
    """A containerd of the test's own, run by systemd as a transient service."""

    def __init__(self, ctrd: Containerd, env: dict[str, str]) -> None:
        self.ctrd = ctrd
        self.unit = f"{ctrd.namespace}.service"
        setenv = [f"--setenv={k}={v}" for k, v in env.items()]
        subprocess.run(
            ["systemd-run", f"--unit={self.unit}", "--property=KillMode=process",
             f"--working-directory={ctrd.tmp}", *setenv,
             ctrd.host.containerd, "--config", str(ctrd.config_path)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.since = self.journal_cursor()
        deadline = time.monotonic() + START_TIMEOUT
        while not ctrd._ready():
            assert time.monotonic() < deadline, f"containerd not ready:\n{self.journal()}"
            time.sleep(0.1)

    @property
    def cgroup(self) -> Path:
        return CGROUP_ROOT / "system.slice" / self.unit

    def procs(self) -> list[int]:
        try:
            return sorted(int(p) for p in (self.cgroup / "cgroup.procs").read_text().split())
        except FileNotFoundError:
            return []

    def main_pid(self) -> int:
        out = subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", self.unit],
                             check=True, capture_output=True, text=True, timeout=30)  # fmt: skip
        return int(out.stdout)

    def journal_cursor(self) -> str:
        out = subprocess.run(["journalctl", "-n", "0", "--show-cursor", "-q"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        return out.stdout.strip().removeprefix("-- cursor: ")

    def journal(self) -> str:
        """What systemd logged about the unit (not containerd's own output)."""
        out = subprocess.run(
            ["journalctl", "--no-pager", "-o", "cat", f"--after-cursor={self.since}",
             "_PID=1", f"UNIT={self.unit}"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return out.stdout

    def stop(self) -> None:
        subprocess.run(["systemctl", "stop", self.unit], capture_output=True, timeout=120)
        subprocess.run(["systemctl", "reset-failed", self.unit], capture_output=True, timeout=30)


@pytest.fixture
def service(integration_env: None, busybox_archive: Path) -> Iterator[Service]:
    ctrd = Containerd(start=False)
    wanted = ("PATH", "PYSHIM_TEMPLATE_DIR", "CONTAINERD_SUPPRESS_DEPRECATION_WARNINGS")
    env = {k: v for k, v in ctrd.env().items() if k in wanted}
    env[IDLE_ENV] = str(IDLE)
    svc: Service | None = None
    try:
        svc = Service(ctrd, env)
        ctrd.ctr("images", "import", str(busybox_archive), timeout=120)
        yield svc
    finally:
        # close() cleans up through containerd, and starts its own one if ours is gone.
        if svc is not None and svc.procs():
            ctrd.close()
            svc.stop()
        else:
            if svc is not None:
                svc.stop()
            ctrd.close()


def test_template_leaves_an_idle_node_and_a_restart_finds_nothing_left_over(
    service: Service,
) -> None:
    ctrd = service.ctrd
    containerd_pid = service.main_pid()
    # The first start spawns the template (and runs itself); the next is the spare's,
    # a daemon the template watches while it lives.
    ctrd.ctr("run", "-d", "--runtime", PYSHIM, BUSYBOX_REF, "t1", "sleep", "300")
    wait_until("t1 running", lambda: task_status(ctrd, "t1") == "RUNNING")
    deadline = time.monotonic() + 60
    while not (templates(ctrd) and ctrd.spare_pids()):
        assert time.monotonic() < deadline, describe(service.procs())
        time.sleep(0.1)
    template = templates(ctrd)
    assert len(template) == 1, describe(service.procs())
    assert template[0] in service.procs()
    ctrd.ctr("run", "-d", "--runtime", PYSHIM, BUSYBOX_REF, "t2", "sleep", "300")
    wait_until("t2 running", lambda: task_status(ctrd, "t2") == "RUNNING")
    assert templates(ctrd) == template
    # Past the idle period: a daemon of its own lives, so the template stays.
    time.sleep(IDLE + 2)
    assert templates(ctrd) == template, describe(service.procs())
    assert ctrd.spare_pids(), "the template keeps a spare while it serves"
    for cid in ("t1", "t2"):
        ctrd.ctr("task", "kill", "-s", "SIGKILL", cid)
        wait_until(f"{cid} stopped", lambda c=cid: task_status(ctrd, c) == "STOPPED")  # type: ignore[misc]
        ctrd.ctr("task", "delete", cid)
        ctrd.ctr("container", "rm", cid)
    # No container, no start: the template and its spare leave; containerd alone stays.
    wait_until("the template and its spare to leave",
               lambda: not templates(ctrd) and not ctrd.spare_pids(),
               timeout=IDLE + 30)  # fmt: skip
    wait_until("only containerd in its service's cgroup",
               lambda: service.procs() == [containerd_pid], timeout=30)  # fmt: skip
    service.stop()
    log = service.journal()
    assert "remains running after unit stopped" not in log, log
    assert not service.cgroup.exists()
