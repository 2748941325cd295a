"""/proc and ``ctr events`` parsers used by the shim benchmarks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from bench import procfs
from bench.containerd_env import PrivateContainerd, parse_event_line
from bench.procfs import (
    MemoryUsage,
    find_shims,
    parse_ctxt_switches,
    parse_ppid,
    parse_smaps_rollup,
    parse_stat_cpu_ticks,
    parse_unix_sockets,
    shim_from_cmdline,
)

SMAPS_ROLLUP = """\
55b7f15b7000-7ffe6fa07000 ---p 00000000 00:00 0                          [rollup]
Rss:                1756 kB
Pss:                 354 kB
Pss_Dirty:           112 kB
Shared_Clean:       1592 kB
Shared_Dirty:          0 kB
Private_Clean:        52 kB
Private_Dirty:       112 kB
Swap:                  0 kB
"""

ADDRESS = "/tmp/pyshim-bench-x/containerd.sock"


def test_parse_smaps_rollup() -> None:
    assert parse_smaps_rollup(SMAPS_ROLLUP) == MemoryUsage(rss_kb=1756, pss_kb=354, private_kb=164)


def test_parse_smaps_rollup_splits_file_pss_where_the_kernel_does() -> None:
    text = SMAPS_ROLLUP.replace(
        "Pss_Dirty:", "Pss_Anon:            116 kB\nPss_File:             238 kB\nPss_Dirty:"
    )
    assert parse_smaps_rollup(text) == MemoryUsage(1756, 354, 164, pss_file_kb=238)


def test_parse_smaps_rollup_rejects_other_text() -> None:
    with pytest.raises(ValueError):
        parse_smaps_rollup("Name:\tbash\n")


def test_memory_usage_adds() -> None:
    assert MemoryUsage(1, 2, 3, 4) + MemoryUsage(10, 20, 30, 40) == MemoryUsage(11, 22, 33, 44)


def test_parse_ctxt_switches() -> None:
    text = "Name:\tx\nvoluntary_ctxt_switches:\t17\nnonvoluntary_ctxt_switches:\t4\n"
    assert parse_ctxt_switches(text) == (17, 4)
    with pytest.raises(ValueError):
        parse_ctxt_switches("Name:\tx\n")


def test_parse_stat_with_spaces_and_parens_in_comm() -> None:
    # Fields after comm: state ppid pgrp session tty tpgid flags minflt cminflt majflt
    # cmajflt utime stime ...
    stat = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3 0\n"
    assert parse_ppid(stat) == 1
    assert parse_stat_cpu_ticks(stat) == 12


def _go_argv(address: str = ADDRESS) -> list[str]:
    return [
        "/usr/bin/containerd-shim-runc-v2",
        "-namespace",
        "bench",
        "-id",
        "c1",
        "-address",
        address,
    ]


def test_go_shim_daemon_is_found() -> None:
    shim = shim_from_cmdline(10, _go_argv(), ADDRESS)
    assert shim is not None
    assert shim.binary == "containerd-shim-runc-v2"
    assert shim.runtime == "io.containerd.runc.v2"
    assert shim.container_id == "c1"


def test_python_shim_behind_its_interpreter_is_found() -> None:
    argv = [
        "/work/main/.venv/bin/python",
        "/work/main/.venv/bin/containerd-shim-pyshim-v1",
        "-namespace=bench",
        "-id=c2",
        f"-address={ADDRESS}",
        "-debug",
    ]
    shim = shim_from_cmdline(11, argv, ADDRESS)
    assert shim is not None
    assert shim.runtime == "io.containerd.pyshim.v1"
    assert shim.container_id == "c2"


def test_other_containerds_shims_are_not_ours() -> None:
    assert shim_from_cmdline(12, _go_argv("/run/containerd/containerd.sock"), ADDRESS) is None


def test_start_and_delete_invocations_are_not_daemons() -> None:
    assert shim_from_cmdline(13, [*_go_argv(), "start"], ADDRESS) is None
    assert shim_from_cmdline(14, [*_go_argv(), "-bundle", "/b", "delete"], ADDRESS) is None


def test_unrelated_process_is_ignored() -> None:
    assert shim_from_cmdline(15, ["/usr/bin/containerd", "--config", "x"], ADDRESS) is None
    assert shim_from_cmdline(16, [], ADDRESS) is None


NET_UNIX = """\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 501 /run/containerd/s/aa
0000000000000000: 00000002 00000000 00010000 0001 01 502 @/containerd-shim/abstract
0000000000000000: 00000003 00000000 00000000 0001 03 503
0000000000000000: 00000002 00000000 00010000 0001 01 504 /run/containerd/s/bb
"""


def test_parse_unix_sockets_keeps_named_paths_only() -> None:
    assert parse_unix_sockets(NET_UNIX) == {
        501: "/run/containerd/s/aa",
        504: "/run/containerd/s/bb",
    }


def _fake_process(proc: Path, pid: int, ppid: int, argv: list[str], inodes: list[int]) -> None:
    d = proc / str(pid)
    (d / "fd").mkdir(parents=True)
    (d / "stat").write_text(f"{pid} (python3) S {ppid} 1 1 0 -1 4194560 0 0 0 0 1 2 0 0\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    for i, inode in enumerate(inodes):
        os.symlink(f"socket:[{inode}]", d / "fd" / str(i + 3))


def test_forked_shim_showing_the_templates_command_line_is_found_by_its_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under User-Mode Linux a forked daemon cannot set its command line (no
    # PR_SET_MM_MAP): it shows the template's, without -address or -id.
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "unix").write_text(NET_UNIX)
    template = ["/v/bin/python", "-IS", "/v/bin/containerd-shim-pyshim-v1", "template"]
    _fake_process(tmp_path, 40, 1, template, [])  # the template: no shim socket
    _fake_process(tmp_path, 41, 1, [*template, "spare"], [503])  # a spare
    _fake_process(tmp_path, 42, 1, template, [503, 504])  # the daemon of container c2
    _fake_process(tmp_path, 43, 1, ["/usr/bin/python3", "x.py"], [501])  # not a shim
    _fake_process(tmp_path, 44, 7, template, [501])  # not re-parented to init
    _fake_process(tmp_path, 45, 1, _go_argv(), [])  # found by its command line
    monkeypatch.setattr(procfs, "PROC", tmp_path)
    sockets = {"/run/containerd/s/aa": "c1", "/run/containerd/s/bb": "c2"}
    found = find_shims(ADDRESS, sockets)
    assert [(s.pid, s.runtime, s.container_id) for s in found] == [
        (42, "io.containerd.pyshim.v1", "c2"),
        (45, "io.containerd.runc.v2", "c1"),
    ]
    # Without the socket map, only command lines count.
    assert [s.pid for s in find_shims(ADDRESS)] == [45]


def test_parse_event_line() -> None:
    line = (
        "2026-11-28 18:10:48.029941987 +0000 UTC bx /tasks/exit "
        '{"container_id":"s1","id":"s1","pid":7782,"exit_status":137}\n'
    )
    assert parse_event_line(line) == (
        "bx",
        "/tasks/exit",
        '{"container_id":"s1","id":"s1","pid":7782,"exit_status":137}',
    )


def test_parse_event_line_ignores_noise() -> None:
    assert parse_event_line("ctr: connection refused\n") is None
    assert parse_event_line("\n") is None


def test_private_containerd_config_stays_in_its_workdir(tmp_path: Path) -> None:
    env = PrivateContainerd(tmp_path, namespace="bench-1")
    config = env.config_path.read_text()
    assert f'address = "{tmp_path}/containerd.sock"' in config
    assert f'address = "{tmp_path}/containerd.sock.ttrpc"' in config
    assert "/var/lib/containerd" not in config
    assert "/run/containerd" not in config
    # The venv the bench runs from (its shim binary), whatever the venv is called.
    assert env.env()["PATH"].split(":")[0] == os.path.dirname(sys.executable)


def test_shim_socket_path_matches_the_spec_example(tmp_path: Path) -> None:
    env = PrivateContainerd(tmp_path, namespace="specns")
    env.address = "/tmp/spec-ctrd/containerd.sock"
    assert env.shim_socket_path("c1") == Path(
        "/run/containerd/s/1edd1a9a40eab4863a4065f09a93cf7db08f16c567337ba3e5937b4636ae16dd"
    )
