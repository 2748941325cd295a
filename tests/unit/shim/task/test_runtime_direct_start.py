"""Runc.start without runc: the exec fifo read the way `runc start` reads it."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shim.reaper import Reaper
from shim.task.runtime import Runc, RuncOptions, RuntimeFailure
from tests.support.reaper import installed_reaper

# Records its argv; stands in for runc (the name matters: direct start is runc's).
FAKE_RUNC = """#!/bin/sh
printf '%s\\n' "$@" >> "$RECORD"
"""

# runc init's last steps: block opening the fifo for writing until `start` opens it
# for reading, write "0", exec the container's process (the fd is close-on-exec).
INIT = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CLOEXEC)
os.write(fd, b"0")
os.execv("/bin/sleep", ["sleep", "30"])
"""


@pytest.fixture
async def reaper() -> AsyncIterator[Reaper]:
    async with installed_reaper() as r:
        yield r


class Setup:
    def __init__(self, tmp_path: Path, name: str = "runc") -> None:
        self.bin = tmp_path / "bin" / name
        self.bin.parent.mkdir()
        self.bin.write_text(FAKE_RUNC)
        self.bin.chmod(self.bin.stat().st_mode | stat.S_IXUSR)
        self.record = tmp_path / "argv"
        self.root = tmp_path / "root"
        self.state = self.root / "ns1" / "c1"
        self.state.mkdir(parents=True)
        self.fifo = self.state / "exec.fifo"
        os.mkfifo(self.fifo)
        self.bundle = tmp_path / "bundle"
        self.bundle.mkdir()
        self.spec({"process": {"args": ["sleep", "30"]}})
        self.pid_file = self.bundle / "init.pid"
        self.procs: list[subprocess.Popen[bytes]] = []

    def spec(self, spec: object) -> None:
        (self.bundle / "config.json").write_text(json.dumps(spec))

    def runc(self, reaper: Reaper) -> Runc:
        opts = RuncOptions(binary=str(self.bin), root=str(self.root))
        return Runc(reaper, opts, "ns1", str(self.bundle))

    async def create(self, runc: Runc) -> None:
        await runc.create(
            "c1", pid_file=str(self.pid_file), console_socket=None, stdio=(None, None, None)
        )

    def init(self, code: str = INIT) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", code, str(self.fifo)])
        self.procs.append(proc)
        self.pid_file.write_text(str(proc.pid))
        return proc

    def commands(self) -> list[str]:
        """The runc subcommand of every fake runc run so far."""
        if not self.record.exists():
            return []
        lines = self.record.read_text().splitlines()
        return [word for word in lines if word in ("create", "start")]


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    s = Setup(tmp_path)
    monkeypatch.setenv("RECORD", str(s.record))
    yield s
    for proc in s.procs:
        proc.kill()
        proc.wait()


def _wait_blocked_in_open(proc: subprocess.Popen[bytes]) -> None:
    """Until the fake init sleeps in its open of the fifo (as runc init does)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        wchan = Path(f"/proc/{proc.pid}/wchan").read_text()
        if "fifo" in wchan or "pipe" in wchan or "wait_for_partner" in wchan:
            return
        time.sleep(0.01)
    raise AssertionError(f"the fake init never blocked in the fifo's open ({wchan})")


async def test_start_reads_the_fifo_and_removes_it(reaper: Reaper, setup: Setup) -> None:
    runc = setup.runc(reaper)
    await setup.create(runc)
    init = setup.init()
    _wait_blocked_in_open(init)
    await runc.start("c1")
    assert setup.commands() == ["create"]  # no `runc start`
    assert not setup.fifo.exists()  # what makes runc call the container "running"
    # Returned after the init's exec: the container's process runs.
    assert Path(f"/proc/{init.pid}/cmdline").read_bytes().split(b"\0")[0] == b"sleep"


async def test_start_before_the_init_reaches_the_fifo(reaper: Reaper, setup: Setup) -> None:
    runc = setup.runc(reaper)
    await setup.create(runc)
    # The init opens the fifo only after `start` has opened it for reading.
    init = setup.init("import time; time.sleep(0.3)\n" + INIT)
    await runc.start("c1")
    assert setup.commands() == ["create"]
    assert not setup.fifo.exists()
    assert Path(f"/proc/{init.pid}/cmdline").read_bytes().split(b"\0")[0] == b"sleep"


async def test_dead_init_is_runcs_error(reaper: Reaper, setup: Setup) -> None:
    runc = setup.runc(reaper)
    await setup.create(runc)
    init = setup.init("raise SystemExit(1)")
    init.wait()
    with pytest.raises(RuntimeFailure, match="container process is already dead"):
        await runc.start("c1")
    assert setup.fifo.exists()  # left for runc's delete, as runc leaves it


async def test_init_that_closes_without_writing(reaper: Reaper, setup: Setup) -> None:
    runc = setup.runc(reaper)
    await setup.create(runc)
    code = "import os, sys, time\nos.close(os.open(sys.argv[1], os.O_WRONLY))\ntime.sleep(30)\n"
    setup.init(code)
    with pytest.raises(RuntimeFailure, match="cannot start an already running container"):
        await runc.start("c1")


@pytest.mark.parametrize(
    "case", ["poststart hooks", "not created by this shim", "not runc", "no fifo"]
)
async def test_runc_starts_it_otherwise(
    reaper: Reaper, setup: Setup, case: str, tmp_path: Path
) -> None:
    if case == "not runc":
        crun = setup.bin.with_name("crun")
        setup.bin.rename(crun)
        setup.bin = crun
    runc = setup.runc(reaper)
    if case != "not created by this shim":
        await setup.create(runc)
    if case == "poststart hooks":
        setup.spec({"hooks": {"poststart": [{"path": "/bin/true"}]}})
    if case == "no fifo":
        setup.fifo.unlink()
    setup.init()
    await runc.start("c1")
    assert setup.commands()[-1] == "start"
