"""The crash harness's view of which process is a shim (tests/crash/procs.py)."""

from __future__ import annotations

from crashtest.procs import Proc, shims

ADDRESS = "/run/ctrd.sock"
ARGV = ("/usr/local/bin/containerd-shim-pyshim-v1", "-namespace", "ns", "-id", "c1",
        "-address", ADDRESS)  # fmt: skip


def _proc(pid: int, ppid: int, argv: tuple[str, ...] = ARGV) -> Proc:
    return Proc(pid=pid, ppid=ppid, state="S", argv=argv, cgroup="0::/")


def test_a_child_vforked_by_the_daemon_is_not_taken_for_it() -> None:
    # Until it execs, a vforked child shows the daemon's command line in /proc.
    daemon, child = _proc(10, 1), _proc(11, 10)
    assert shims(ADDRESS, [daemon, child]) == {"c1": 10}
    assert shims(ADDRESS, [child, daemon]) == {"c1": 10}


def test_other_containerds_and_actions_are_not_shims() -> None:
    other = _proc(20, 1, (*ARGV[:-1], "/other.sock"))
    start = _proc(21, 1, (*ARGV, "start"))
    assert shims(ADDRESS, [other, start, _proc(22, 1)]) == {"c1": 22}
