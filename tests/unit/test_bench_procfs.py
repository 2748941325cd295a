"""/proc and ``ctr events`` parsers used by the shim benchmarks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from bench.containerd_env import PrivateContainerd, parse_event_line
from bench.procfs import (
    MemoryUsage,
    parse_ctxt_switches,
    parse_ppid,
    parse_smaps_rollup,
    parse_stat_cpu_ticks,
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


def test_parse_smaps_rollup_rejects_other_text() -> None:
    with pytest.raises(ValueError):
        parse_smaps_rollup("Name:\tbash\n")


def test_memory_usage_adds() -> None:
    assert MemoryUsage(1, 2, 3) + MemoryUsage(10, 20, 30) == MemoryUsage(11, 22, 33)


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
