"""The crash tool's view of which process is a shim (crashtest/procs.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from crashtest.procs import Proc, serving, shims

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


def test_a_shim_whose_command_line_says_nothing_is_found_by_its_socket(tmp_path: Path) -> None:
    # Where PR_SET_MM_MAP is refused, a forked pyshim daemon keeps the template's
    # command line: who listens on the socket its bundle names is the shim.
    here = os.getpid()
    me = Proc(pid=here, ppid=1, state="S", argv=("python3", "template", "spare"), cgroup="0::/")
    listening, bound = str(tmp_path / "a"), str(tmp_path / "b")
    with socket.socket(socket.AF_UNIX) as a, socket.socket(socket.AF_UNIX) as b:
        a.bind(listening)
        a.listen()
        b.bind(bound)  # bound, not listening: not a server
        (tmp_path / "stale").touch()  # a dead shim's file
        paths = {listening, bound, str(tmp_path / "stale")}
        assert serving(paths, [me]) == {listening: here}
        assert serving(paths) == {listening: here}
        # A `start` holding it for a moment is not the shim.
        start = Proc(pid=here, ppid=1, state="S", argv=("shim", "-id", "c1", "start"), cgroup="")
        assert serving(paths, [start]) == {}
