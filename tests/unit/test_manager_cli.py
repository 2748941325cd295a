"""Argument parsing of the pyshim CLI: pure, no daemon."""

from __future__ import annotations

import argparse
import signal

import pytest

from manager import cli
from manager.paths import Paths


def test_memory_units() -> None:
    assert cli.parse_size("67108864") == 64 << 20
    assert cli.parse_size("64m") == 64 << 20
    assert cli.parse_size("64MiB") == 64 << 20
    assert cli.parse_size("1g") == 1 << 30
    assert cli.parse_size("512k") == 512 << 10
    for bad in ("", "m", "12x", "-5m", "0", "1.2.3m"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_size(bad)


def test_signals_by_name_and_number() -> None:
    assert cli.parse_signal("TERM") == signal.SIGTERM
    assert cli.parse_signal("sigkill") == signal.SIGKILL
    assert cli.parse_signal("9") == 9
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_signal("NOPE")
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_signal("999")


def test_env_requires_key(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.parse_env("A=b=c") == "A=b=c"
    monkeypatch.setenv("FROM_HERE", "x")
    assert cli.parse_env("FROM_HERE") == "FROM_HERE=x"
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_env("NOT_SET_HERE")
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_env("=v")


@pytest.mark.parametrize(
    ("words", "rootfs", "expected"),
    [
        (["--", "echo", "hi"], "", ("", ["echo", "hi"])),
        (["busybox", "--", "sh", "-c", "x"], "", ("busybox", ["sh", "-c", "x"])),
        (["busybox"], "", ("busybox", [])),
        (["busybox", "echo", "--", "x"], "", None),
        (["echo", "hi"], "/r", ("", ["echo", "hi"])),
        (["img", "--", "echo"], "/r", None),
        ([], "", None),
    ],
)
def test_split_image_and_cmd(
    words: list[str], rootfs: str, expected: tuple[str, list[str]] | None
) -> None:
    if expected is None:
        with pytest.raises(cli.UsageError):
            cli.split_image_and_cmd(words, rootfs)
    else:
        assert cli.split_image_and_cmd(words, rootfs) == expected


def test_run_flags_parse() -> None:
    args = cli.build_parser().parse_args(
        ["run", "--rm", "-d", "-t", "-i", "--name", "web", "--env", "A=1", "--env", "B=2",
         "--workdir", "/tmp", "--user", "1000:1000", "--memory", "64m", "--cpus", "0.5",
         "--", "sleep", "1"]
    )  # fmt: skip
    assert (args.rm, args.detach, args.tty, args.interactive) == (True, True, True, True)
    assert args.name == "web"
    assert args.env == ["A=1", "B=2"]
    assert args.memory == 64 << 20
    assert args.cpus == 0.5
    assert args.image_and_cmd == ["--", "sleep", "1"]


def test_bad_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["run", "--memory", "lots", "--", "true"])
    assert exc.value.code == 2
    assert "invalid size" in capsys.readouterr().err


def test_manager_not_running_says_how_to_start(
    tmp_path: object, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYSHIM_RUN_DIR", f"{tmp_path}/run")
    monkeypatch.setenv("PYSHIM_STATE_DIR", f"{tmp_path}/state")
    assert cli.main(["ps"]) == cli.EXIT_MANAGER_ERROR
    err = capsys.readouterr().err
    assert "pyshimd is not running" in err
    assert f"pyshimd --run-dir {tmp_path}/run" in err


def test_paths_flag_beats_env_beats_default() -> None:
    env = {"PYSHIM_RUN_DIR": "/e/run", "PYSHIM_STATE_DIR": "/e/state"}
    assert Paths.resolve(None, None, env).run_dir.as_posix() == "/e/run"
    assert Paths.resolve("/f/run", None, env).run_dir.as_posix() == "/f/run"
    default = Paths.resolve(None, None, {})
    assert (default.run_dir.as_posix(), default.state_dir.as_posix()) == (
        "/run/pyshim",
        "/var/lib/pyshim",
    )
    assert default.socket.as_posix() == "/run/pyshim/pyshimd.sock"


def test_restart_policies() -> None:
    assert cli.parse_restart("no") == ("no", 0)
    assert cli.parse_restart("always") == ("always", 0)
    assert cli.parse_restart("unless-stopped") == ("unless-stopped", 0)
    assert cli.parse_restart("on-failure") == ("on-failure", 0)
    assert cli.parse_restart("on-failure:5") == ("on-failure", 5)
    for bad in ("", "sometimes", "on-failure:", "on-failure:0", "on-failure:-1", "always:3"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_restart(bad)


def test_publish_specs() -> None:
    p = cli.parse_publish("8080:80")
    assert (p.host_port, p.container_port, p.protocol, p.host_ip) == (8080, 80, "tcp", "")
    p = cli.parse_publish("127.0.0.1:53:5353/udp")
    assert (p.host_port, p.container_port, p.protocol, p.host_ip) == (53, 5353, "udp", "127.0.0.1")
    for bad in ("80", "a:b", "0:80", "80:70000", "80:80/sctp", "1:2:3:4"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_publish(bad)


def test_run_defaults_without_flags() -> None:
    """A command's arguments are added when it is parsed: their defaults must be set
    all the same (argparse sets defaults before it parses)."""
    args = cli.build_parser().parse_args(["run", "busybox", "--", "true"])
    assert (args.rm, args.detach, args.tty, args.interactive) == (False, False, False, False)
    assert (args.env, args.publish, args.volume, args.network) == ([], [], [], "bridge")
    assert args.restart == ("no", 0)
    kill = cli.build_parser().parse_args(["kill", "web"])
    assert kill.signal == signal.SIGKILL


def test_every_command_parses_and_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as exc:
            cli.build_parser().parse_args([name, "--help"])
        assert exc.value.code == 0
        assert f"usage: pyshim {name}" in capsys.readouterr().out
