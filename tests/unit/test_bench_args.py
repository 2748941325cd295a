"""``python -m bench``: flags that shape the fleet scenarios, and what it refuses to run on."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.containerd_env import launcher_problem
from bench.shims import parse_args
from shim.boot import launcher


def test_scale_takes_one_count_or_a_list() -> None:
    assert parse_args([]).scale == (20,)
    assert parse_args(["--scale", "20"]).scale == (20,)
    assert parse_args(["--scale", "1000,100"]).scale == (100, 1000)


@pytest.mark.parametrize("argv", [["--scale", "0"], ["--scale", "5,x"], ["--pods", "0"]])
def test_bad_counts_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2


def test_pods_defaults_and_flags() -> None:
    args = parse_args([])
    assert (args.pods, args.pod_size) == (5, 4)
    args = parse_args(["--pods", "3", "--pod-size", "2", "--scenarios", "pods"])
    assert (args.pods, args.pod_size) == (3, 2)


def test_scale_ksm_is_off_unless_asked() -> None:
    assert parse_args([]).scale_ksm is False
    assert parse_args(["--scale-ksm"]).scale_ksm is True


def test_containerd_host_is_1_6_unless_asked() -> None:
    assert parse_args([]).containerd == "1.6"
    assert parse_args(["--containerd", "2.3"]).containerd == "2.3"
    with pytest.raises(SystemExit):
        parse_args(["--containerd", "1.7"])


def test_bench_refuses_pips_wrapper_in_place_of_the_launcher(tmp_path: Path) -> None:
    shim, cli = tmp_path / "containerd-shim-pyshim-v1", tmp_path / "pyshim"
    launcher.install(str(shim), launcher.render())
    cli.write_text("#!/venv/bin/python3\nimport sys\nfrom manager.cli import main\n")
    problem = launcher_problem(tmp_path, "containerd-shim-pyshim-v1", "pyshim")
    assert problem is not None and problem.startswith(f"pyshim in {tmp_path}: not pyshim's")
    assert launcher_problem(tmp_path, "containerd-shim-pyshim-v1") is None
    launcher.install(str(cli), launcher.render(entry="manager.cli:main"))
    assert launcher_problem(tmp_path, "containerd-shim-pyshim-v1", "pyshim") is None
