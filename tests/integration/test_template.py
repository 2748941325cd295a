"""Shims forked from the template (shim/boot/template.py) under a real containerd.

Each test's containerd has its own template directory (tests/support/containerd.py
sets PYSHIM_TEMPLATE_DIR), and its close() stops the template by PID.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containerd import Containerd
from tests.support.hosts import every_host
from tests.support.template import spare_pids

pytestmark = pytest.mark.integration

RUNTIME = "io.containerd.pyshim.v1"


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _ppid(pid: int) -> int:
    return int(_stat(pid)[1])


def _wait(cond: object, what: str, timeout: float = 20.0) -> None:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _template(ctrd: Containerd) -> int:
    """Wait for the template the first start spawned to serve; its pid."""
    _wait(
        lambda: bool(ctrd.template_pids()) and any(ctrd.template_dir.glob("*.sock")),
        "the template to serve",
    )
    (pid,) = ctrd.template_pids()
    return pid


def _daemon_of(ctrd: Containerd, cid: str) -> int:
    for pid in ctrd.shim_pids():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"-id" in argv and argv[argv.index(b"-id") + 1] == cid.encode() and argv[-2] != b"start":
            return pid
    raise AssertionError(f"no shim daemon for {cid}")


def _forked(ctrd: Containerd, pid: int) -> bool:
    """A re-executed daemon stays in containerd's session; a forked one has its own."""
    assert ctrd.pid is not None
    return os.getsid(pid) != os.getsid(ctrd.pid)


def _run_d(ctrd: Containerd, image: str, cid: str) -> int:
    ctrd.ctr("run", "-d", "--runtime", RUNTIME, image, cid, "sleep", "300")
    return _daemon_of(ctrd, cid)


def _remove(ctrd: Containerd, cid: str) -> None:
    ctrd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
    _wait(
        lambda: (
            ctrd.ctr("tasks", "delete", cid, check=False).returncode != 0
            or cid not in ctrd.ctr("tasks", "ls", "-q").stdout.split()
        ),
        f"task {cid} deleted",
    )
    ctrd.ctr("containers", "delete", cid, check=False)


@every_host
def test_first_start_falls_back_then_shims_are_forked(
    containerd: Containerd, busybox_image: str
) -> None:
    assert not containerd.template_dir.exists()
    first = _run_d(containerd, busybox_image, "c1")
    # No template yet: the first daemon was re-executed, and it spawned the template.
    assert not _forked(containerd, first)
    template = _template(containerd)
    assert _ppid(template) == 1
    assert os.getsid(template) == template  # detached from containerd's session
    _wait(lambda: len(spare_pids(containerd.template_dir)) == 1, "the template's spare")
    (spare,) = spare_pids(containerd.template_dir)
    # stdio, its lock, its code watch, its socket, and its link to the spare.
    fds = sorted(os.listdir(f"/proc/{template}/fd"), key=int)
    assert fds == ["0", "1", "2", "3", "4", "5", "6"]
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{template}/fd/{fd}") == "/dev/null"
    assert os.readlink(f"/proc/{template}/fd/4") == "anon_inode:inotify"
    assert os.readlink(f"/proc/{template}/fd/6").startswith("socket:")
    # `start` finds it through its link, without digesting the code.
    (link,) = containerd.template_dir.glob("*.link")
    (sock,) = containerd.template_dir.glob("*.sock")
    assert os.readlink(link) == sock.name
    assert _ppid(spare) == 1

    res = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, busybox_image, "c2", "echo", "hello", timeout=60
    )
    assert res.stdout == "hello\n"

    (spare,) = spare_pids(containerd.template_dir)
    second = _run_d(containerd, busybox_image, "c3")
    assert _forked(containerd, second)
    assert second == spare  # the spare became the daemon
    _wait(
        lambda: [p for p in spare_pids(containerd.template_dir) if p != second] != [],
        "the next spare",
    )
    assert _ppid(second) == 1
    assert os.getpgid(second) == second
    assert Path(f"/proc/{second}/comm").read_text().strip() == "containerd-shim"
    bundle = containerd.state / "io.containerd.runtime.v2.task" / containerd.namespace / "c3"
    assert os.readlink(f"/proc/{second}/cwd") == str(bundle)
    assert os.readlink(f"/proc/{second}/fd/0") == "/dev/null"
    env = Path(f"/proc/{second}/environ").read_bytes().split(b"\0")
    assert f"TTRPC_ADDRESS={containerd.ttrpc_address}".encode() in env
    parent_adj = int(Path(f"/proc/{containerd.pid}/oom_score_adj").read_text())
    assert int(Path(f"/proc/{second}/oom_score_adj").read_text()) == min(parent_adj + 1, 1000)
    res = containerd.ctr("tasks", "exec", "--exec-id", "e1", "c3", "echo", "exec-ok")
    assert res.stdout == "exec-ok\n"
    if containerd.host.v2:
        # Both paths answered containerd 2.3's bootstrap alike (task API v3): the
        # re-executed start (c1) and the spare that ran start itself (c3).
        for cid in ("c1", "c3"):
            recorded = json.loads((containerd.bundle(cid) / "bootstrap.json").read_text())
            assert (recorded["version"], recorded["protocol"]) == (3, "ttrpc"), recorded
    for cid in ("c1", "c3"):
        _remove(containerd, cid)
    _wait(lambda: not os.path.exists(f"/proc/{second}"), "the forked shim to exit")
    assert "failed to delete" not in containerd.log_text()


def test_forked_shim_survives_template_sigkill(containerd: Containerd, busybox_image: str) -> None:
    _run_d(containerd, busybox_image, "c1")
    template = _template(containerd)
    daemon = _run_d(containerd, busybox_image, "c2")
    assert _forked(containerd, daemon)
    os.kill(template, signal.SIGKILL)
    _wait(lambda: template not in containerd.template_pids(), "the template to die")
    # Its idle spare goes with it.
    _wait(lambda: not spare_pids(containerd.template_dir), "the spare to exit")
    time.sleep(0.2)
    assert os.path.exists(f"/proc/{daemon}")
    assert containerd.ctr("tasks", "exec", "--exec-id", "e1", "c2", "true").returncode == 0
    ls = containerd.ctr("tasks", "ls").stdout
    assert "c2" in ls and "RUNNING" in ls
    # The next start finds the dead socket, re-executes, and brings a new template up.
    third = _run_d(containerd, busybox_image, "c3")
    assert not _forked(containerd, third)
    assert _template(containerd) != template
    res = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, busybox_image, "c4", "echo", "again", timeout=60
    )
    assert res.stdout == "again\n"
    for cid in ("c1", "c2", "c3"):
        _remove(containerd, cid)


def test_socket_of_a_sigkilled_forked_shim_is_removed_without_containerd(
    containerd: Containerd, busybox_image: str
) -> None:
    # Finding 10 (docs/crash-recovery.md): containerd may remove the bundle before the
    # shim's `delete` can run in it, and nothing of a SIGKILLed shim runs again. The
    # template that made the shim removes its socket file then.
    _run_d(containerd, busybox_image, "c1")
    _template(containerd)
    _wait(lambda: len(spare_pids(containerd.template_dir)) == 1, "the template's spare")
    daemon = _run_d(containerd, busybox_image, "c2")
    assert _forked(containerd, daemon)
    address = (containerd.bundle("c2") / "address").read_text().strip()
    sock = Path(address.removeprefix("unix://"))
    assert sock.exists()
    containerd.kill9(start_again=False)  # no clean-up from containerd at all
    os.kill(daemon, signal.SIGKILL)
    _wait(lambda: not sock.exists(), "the template to remove the dead shim's socket file")
    containerd.start()  # so that close() cleans up through it


def test_wedged_template_falls_back(containerd: Containerd, busybox_image: str) -> None:
    """A template that accepts but never forks costs one timeout, then is replaced."""
    _run_d(containerd, busybox_image, "c1")
    template = _template(containerd)
    (sock,) = containerd.template_dir.glob("*.sock")
    os.kill(template, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        res = containerd.ctr(
            "run", "--rm", "--runtime", RUNTIME, busybox_image, "c2", "echo", "hi", timeout=60
        )
        elapsed = time.monotonic() - t0
        assert res.stdout == "hi\n"
        assert elapsed < 10
        # start killed the wedged template (SO_PEERCRED) and removed its socket.
        _wait(lambda: not os.path.exists(f"/proc/{template}"), "the wedged template killed")
    finally:
        if os.path.exists(f"/proc/{template}"):
            os.kill(template, signal.SIGKILL)
    assert not sock.exists() or _template(containerd) != template
    _remove(containerd, "c1")


def test_broken_template_socket_falls_back(containerd: Containerd, busybox_image: str) -> None:
    """Something at the template's path that answers garbage: start re-executes."""
    _run_d(containerd, busybox_image, "c1")
    template = _template(containerd)
    (sock,) = containerd.template_dir.glob("*.sock")
    os.kill(template, signal.SIGKILL)
    _wait(lambda: not os.path.exists(f"/proc/{template}"), "the template to die")
    fake = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, socket\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
            f"os.unlink({str(sock)!r}); s.bind({str(sock)!r}); s.listen()\n"
            "print('ready', flush=True)\n"
            "while True:\n"
            "    c, _ = s.accept(); c.recv(1 << 20); c.send(b'not json'); c.close()\n",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert fake.stdout is not None
        assert fake.stdout.readline() == b"ready\n"
        res = containerd.ctr(
            "run", "--rm", "--runtime", RUNTIME, busybox_image, "c2", "echo", "hi", timeout=60
        )
        assert res.stdout == "hi\n"
        daemon = _run_d(containerd, busybox_image, "c3")
        assert not _forked(containerd, daemon)
    finally:
        fake.kill()
        fake.wait()
    _remove(containerd, "c1")
    _remove(containerd, "c3")


def test_template_disabled(
    containerd: Containerd, busybox_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYSHIM_TEMPLATE", "0")
    containerd.restart()  # containerd passes its environment on to `start`
    daemon = _run_d(containerd, busybox_image, "c1")
    assert not _forked(containerd, daemon)
    assert containerd.template_pids() == []
    assert not containerd.template_dir.exists()
    _remove(containerd, "c1")


KSM = Path("/sys/kernel/mm/ksm")


def _mergeable_mappings(pid: int) -> int:
    """Mappings of ``pid`` marked for same-page merging ("mg" in smaps' VmFlags)."""
    return sum(
        1
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines()
        if line.startswith("VmFlags:") and " mg" in line
    )


def _task_pid(ctrd: Containerd, cid: str) -> int:
    for line in ctrd.ctr("tasks", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields[0] == cid:
            return int(fields[1])
    raise AssertionError(f"no task {cid}")


@pytest.fixture
def ksmd_fast() -> Iterator[None]:
    """ksmd running and scanning quickly for the test; the node's settings restored."""
    names = ("run", "pages_to_scan", "sleep_millisecs")
    saved = {name: (KSM / name).read_text().strip() for name in names}
    try:
        (KSM / "pages_to_scan").write_text("5000")
        (KSM / "sleep_millisecs").write_text("10")
        (KSM / "run").write_text("1")
        yield
    finally:
        for name in names:
            (KSM / name).write_text(saved[name])


@pytest.fixture
def ksm_opted_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """PYSHIM_KSM=1 in containerd's environment (ask for it before `containerd`)."""
    monkeypatch.setenv("PYSHIM_KSM", "1")


@pytest.fixture
def ksm_not_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYSHIM_KSM", raising=False)


def test_forked_shims_mark_nothing_unless_the_operator_asked(
    ksm_not_asked: None, containerd: Containerd, busybox_image: str, ksmd_fast: None
) -> None:
    # Merged pages are a timing side channel: opt-in only (scripts/ksm.sh).
    _run_d(containerd, busybox_image, "c1")
    _template(containerd)
    _wait(lambda: len(spare_pids(containerd.template_dir)) == 1, "the template's spare")
    daemon = _run_d(containerd, busybox_image, "c2")
    assert _forked(containerd, daemon)
    # Marked just after the Start reply when asked: an exec's reply comes after that.
    assert containerd.ctr("tasks", "exec", "--exec-id", "e1", "c2", "true").returncode == 0
    assert _mergeable_mappings(daemon) == 0
    for cid in ("c1", "c2"):
        _remove(containerd, cid)


def test_forked_shims_merge_identical_pages_and_containers_are_not_marked(
    ksm_opted_in: None, containerd: Containerd, busybox_image: str, ksmd_fast: None
) -> None:
    first = _run_d(containerd, busybox_image, "c1")
    template = _template(containerd)
    daemons = [_run_d(containerd, busybox_image, cid) for cid in ("c2", "c3", "c4")]
    assert all(_forked(containerd, pid) for pid in daemons)
    # A forked daemon marks its heap, arenas and data segments once its container
    # started (just after the Start reply) ...
    _wait(lambda: all(_mergeable_mappings(pid) >= 3 for pid in daemons), "forked daemons marked")
    # ... a re-executed one (different layout) and the template (ksmd would scan it
    # with no shim to share with) are not ...
    assert _mergeable_mappings(first) == 0
    assert _mergeable_mappings(template) == 0
    # ... and never a container: runc starts it with execve, which drops the mark.
    for cid in ("c2", "c3"):
        assert _mergeable_mappings(_task_pid(containerd, cid)) == 0
    # The daemons copied the same template pages with the same writes: ksmd merges them.
    _wait(
        lambda: all(
            int(Path(f"/proc/{pid}/ksm_merging_pages").read_text()) > 100 for pid in daemons
        ),
        "ksmd to merge the forked daemons' pages",
        timeout=120,
    )
    assert containerd.ctr("tasks", "exec", "--exec-id", "e1", "c2", "true").returncode == 0
    for cid in ("c1", "c2", "c3", "c4"):
        _remove(containerd, cid)
