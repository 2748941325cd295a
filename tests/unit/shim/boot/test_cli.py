"""Go-`flag` parsing, the CLI error conventions, -v/-info, and the `delete` action."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from protocol import wire
from protocol.proto.task.v2 import shim_pb2
from shim.boot import cli, delete, flags
from shim.boot.flags import FlagError, HelpRequested, parse_flags

# The argv containerd 1.6.20 was observed to use (shim-cli.md).
CONTAINERD_START = [
    "-namespace", "specns", "-address", "/tmp/spec-ctrd/containerd.sock",
    "-publish-binary", "/usr/bin/containerd", "-id", "c1", "-debug", "start",
]  # fmt: skip
CONTAINERD_DELETE = [
    "-namespace", "specns", "-address", "/tmp/spec-ctrd/containerd.sock",
    "-publish-binary", "/usr/bin/containerd", "-id", "c1",
    "-bundle", "/tmp/spec-ctrd/state/io.containerd.runtime.v2.task/specns/c1", "delete",
]  # fmt: skip


# -- flag syntax ---------------------------------------------------------------------


def test_containerd_start_argv() -> None:
    o = parse_flags(CONTAINERD_START)
    assert (o.namespace, o.address, o.publish_binary, o.id) == (
        "specns",
        "/tmp/spec-ctrd/containerd.sock",
        "/usr/bin/containerd",
        "c1",
    )
    assert o.debug is True
    assert o.action == "start"
    assert o.bundle == ""


def test_containerd_delete_argv() -> None:
    o = parse_flags(CONTAINERD_DELETE)
    assert o.bundle == "/tmp/spec-ctrd/state/io.containerd.runtime.v2.task/specns/c1"
    assert o.debug is False
    assert o.action == "delete"


def test_no_action_means_daemon() -> None:
    o = parse_flags(["-namespace", "ns", "-id", "c1", "-address", "/a"])
    assert o.action == ""
    assert o.args == []


@pytest.mark.parametrize(
    "argv",
    [
        ["-namespace=ns", "-id=c1"],
        ["--namespace", "ns", "--id", "c1"],
        ["--namespace=ns", "-id", "c1"],
    ],
)
def test_value_forms(argv: list[str]) -> None:
    o = parse_flags(argv)
    assert (o.namespace, o.id) == ("ns", "c1")


def test_equals_keeps_the_rest_of_the_value() -> None:
    assert parse_flags(["-address=/a=b"]).address == "/a=b"
    assert parse_flags(["-id="]).id == ""


def test_defaults() -> None:
    o = parse_flags([])
    assert o.publish_binary == "containerd"
    assert (o.namespace, o.address, o.id, o.bundle, o.socket) == ("", "", "", "", "")
    assert (o.debug, o.version, o.info) == (False, False, False)


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("-debug", True),
        ("--debug", True),
        ("-debug=true", True),
        ("-debug=1", True),
        ("-debug=T", True),
        ("-debug=True", True),
        ("-debug=TRUE", True),
        ("-debug=t", True),
        ("-debug=false", False),
        ("-debug=0", False),
        ("-debug=F", False),
        ("-debug=FALSE", False),
        ("--debug=False", False),
    ],
)
def test_bool_values(arg: str, expected: bool) -> None:
    assert parse_flags([arg]).debug is expected


@pytest.mark.parametrize("value", ["yes", "no", "", "on", "2", "tRUE"])
def test_bad_bool_value(value: str) -> None:
    with pytest.raises(FlagError, match=f'invalid boolean value "{value}" for -debug: parse error'):
        parse_flags([f"-debug={value}"])


def test_bool_flag_does_not_take_the_next_argument() -> None:
    # Go: "-debug false" sets debug and "false" is the first non-flag (the action).
    o = parse_flags(["-debug", "false", "start"])
    assert o.debug is True
    assert o.args == ["false", "start"]
    assert o.action == "false"


def test_string_flag_takes_the_next_argument_whatever_it_is() -> None:
    o = parse_flags(["-id", "-debug", "start"])
    assert o.id == "-debug"
    assert o.debug is False
    assert o.action == "start"


def test_parsing_stops_at_first_non_flag() -> None:
    o = parse_flags(["-namespace", "ns", "start", "-debug", "-id", "x"])
    assert o.action == "start"
    assert o.debug is False
    assert o.id == ""
    assert o.args == ["start", "-debug", "-id", "x"]


def test_double_dash_ends_flags_and_is_consumed() -> None:
    o = parse_flags(["-namespace", "ns", "--", "-debug"])
    assert o.debug is False
    assert o.args == ["-debug"]


def test_single_dash_is_a_non_flag() -> None:
    assert parse_flags(["-", "-debug"]).args == ["-", "-debug"]


def test_last_value_wins() -> None:
    o = parse_flags(["-id", "a", "-id", "b", "-debug", "-debug=false"])
    assert o.id == "b"
    assert o.debug is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-foo"], "flag provided but not defined: -foo"),
        (["--foo=1"], "flag provided but not defined: -foo"),
        (["-Debug"], "flag provided but not defined: -Debug"),
        (["-id"], "flag needs an argument: -id"),
        (["---id", "x"], "bad flag syntax: ---id"),
        (["-=x"], "bad flag syntax: -=x"),
        (["--=x"], "bad flag syntax: --=x"),
    ],
)
def test_flag_errors(argv: list[str], message: str) -> None:
    with pytest.raises(FlagError) as info:
        parse_flags(argv)
    assert str(info.value) == message


@pytest.mark.parametrize("arg", ["-h", "-help", "--help", "--h"])
def test_help(arg: str) -> None:
    with pytest.raises(HelpRequested):
        parse_flags([arg])


def test_version_aliases() -> None:
    assert parse_flags(["-v"]).version
    assert parse_flags(["--version"]).version
    assert parse_flags(["-info"]).info


def test_all_brief_flags_are_known() -> None:
    o = parse_flags(
        ["-socket", "/s", "-debug-socket", "/d", "-bundle", "/b", "-publish-binary", ""]
    )
    assert (o.socket, o.debug_socket, o.bundle, o.publish_binary) == ("/s", "/d", "/b", "")


# -- main(): exit codes and output ------------------------------------------------------


def test_unknown_flag_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["shim", "-namespace", "ns", "-bogus", "start"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("flag provided but not defined: -bogus\nUsage of shim:\n")
    assert "  -namespace string\n    \tnamespace that owns the shim\n" in err
    assert '(default "containerd")' in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["shim", "-h"]) == 0
    assert capsys.readouterr().err.startswith("Usage of shim:")


@pytest.mark.parametrize("action", ["start", "delete", ""])
def test_missing_namespace(action: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["shim", "-id", "c1", "-address", "/a"] + ([action] if action else [])
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "io.containerd.pyshim.v1: shim namespace cannot be empty"


def test_version_block(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["/usr/local/bin/containerd-shim-pyshim-v1", "-v"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.split("\n")
    assert lines[0] == "containerd-shim-pyshim-v1:"
    assert lines[1].startswith("  Version:  ")
    assert lines[2].startswith("  Revision: ")
    assert lines[3] == f"  Python version: {sys.version.split()[0]}"
    assert out.endswith("\n\n")


def test_unknown_action_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["shim", "-namespace", "ns", "-debug", "false"]) == 1
    assert capsys.readouterr().err == "io.containerd.pyshim.v1: unknown action 'false'"


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", "."])
def test_start_and_delete_refuse_path_like_ids(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["shim", "-namespace", "ns", "-id", bad, "delete"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("io.containerd.pyshim.v1: invalid shim id")


def test_action_errors_follow_the_go_convention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no config.json: start must fail cleanly
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert cli.main(["shim", "-namespace", "ns", "-id", "c1", "-address", "/a", "start"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("io.containerd.pyshim.v1: ")
    assert "config.json" in err
    assert not err.endswith("\n")


def test_info_prints_runtime_info(
    monkeypatch: pytest.MonkeyPatch, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    options = wire.any_message("runtimeoptions.v1.Options", wire.field_str(2, "/cfg.toml"))
    stdin = io.TextIOWrapper(io.BytesIO(options))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert cli.main(["shim", "-info"]) == 0
    out = capfdbinary.readouterr().out
    fields = {n: v for n, _, v in wire.iter_fields(out)}
    assert fields[1] == b"io.containerd.pyshim.v1"
    version = {n: v for n, _, v in wire.iter_fields(fields[2])}  # type: ignore[arg-type]
    assert version[1] == cli.VERSION.encode()
    assert fields[3] == options
    type_url, features = wire.decode_any(fields[4])  # type: ignore[arg-type]
    assert type_url == cli.FEATURES_TYPE_URL
    assert "ociVersionMax" in json.loads(features)


# -- delete ------------------------------------------------------------------------------


def test_delete_response_matches_spec_bytes() -> None:
    raw = delete.delete_response(4242, 137, 1_700_000_000_500_000_000)
    assert raw.hex(" ") == "08 92 21 10 89 01 1a 0c 08 80 e2 cf aa 06 10 80 ca b5 ee 01"


@pytest.mark.parametrize(
    ("pid", "status", "ns"),
    [(0, 137, 1_700_000_000_000_000_000), (1, 0, 5), (2**31, 255, 1_800_000_000_999_999_999)],
)
def test_delete_response_decodes_with_generated_code(pid: int, status: int, ns: int) -> None:
    resp = shim_pb2.DeleteResponse.FromString(delete.delete_response(pid, status, ns))
    assert (resp.pid, resp.exit_status) == (pid, status)
    assert resp.exited_at.seconds * 10**9 + resp.exited_at.nanos == ns
    assert resp.HasField("exited_at")


def _run_delete(argv: list[str], capfdbinary: pytest.CaptureFixture[bytes]) -> tuple[int, bytes]:
    rc = cli.main(["shim", *argv])
    out = capfdbinary.readouterr().out
    return rc, out


def test_delete_missing_bundle_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    monkeypatch.chdir(tmp_path)
    fake_runc = _fake_runc(tmp_path, exit_code=1)
    monkeypatch.setenv("PATH", f"{fake_runc.parent}:{os.environ['PATH']}")
    argv = ["-namespace", "ns", "-id", "c1", "-bundle", str(tmp_path / "gone"), "delete"]
    for _ in range(2):
        rc, out = _run_delete(argv, capfdbinary)
        assert rc == 0
        resp = shim_pb2.DeleteResponse.FromString(out)
        assert (resp.pid, resp.exit_status) == (0, 137)
        assert resp.exited_at.seconds > 1_700_000_000


def _fake_runc(tmp_path: Path, exit_code: int = 0) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / "runc"
    script.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/runc-argv\n'
        f"echo runc-says-hi\nexit {exit_code}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_delete_runs_runc_with_options_and_reads_init_pid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    fake = _fake_runc(tmp_path)
    bundle = tmp_path / "ns" / "c1"
    bundle.mkdir(parents=True)
    (bundle / "init.pid").write_text("4242")
    root = tmp_path / "myroot"
    (root / "ns" / "c1").mkdir(parents=True)  # runc's state: the shim died before Delete
    (bundle / "options.json").write_text(json.dumps({"binary_name": str(fake), "root": str(root)}))
    monkeypatch.chdir(bundle)
    # Without -bundle the bundle is dirname(cwd)/<id>, as containerd 1.6 relies on.
    rc = cli.main(["shim", "-namespace", "ns", "-id", "c1", "delete"])
    captured = capfdbinary.readouterr()
    assert rc == 0
    resp = shim_pb2.DeleteResponse.FromString(captured.out)
    assert (resp.pid, resp.exit_status) == (4242, 137)
    argv = (tmp_path / "runc-argv").read_text().split("\n")[:-1]
    assert argv == [
        "--root",
        f"{root}/ns",
        "--log",
        f"{bundle}/log.json",
        "--log-format",
        "json",
        "delete",
        "--force",
        "c1",
    ]
    # runc's chatter goes to stderr, never into the protobuf on stdout.
    assert b"runc-says-hi" in captured.err


def test_delete_default_runc_root_and_failure_is_only_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    from shim.boot import delete

    fake = _fake_runc(tmp_path, exit_code=3)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    default_root = tmp_path / "default-root"
    (default_root / "n2" / "c2").mkdir(parents=True)
    monkeypatch.setattr(delete, "DEFAULT_RUNC_ROOT", str(default_root))
    bundle = tmp_path / "c2"
    bundle.mkdir()
    monkeypatch.chdir(bundle)
    rc = cli.main(["shim", "-namespace", "n2", "-id", "c2", "delete"])
    captured = capfdbinary.readouterr()
    assert rc == 0
    assert shim_pb2.DeleteResponse.FromString(captured.out).exit_status == 137
    argv = (tmp_path / "runc-argv").read_text().split("\n")[:-1]
    assert argv[:2] == ["--root", f"{default_root}/n2"]
    assert b"exited with status 3" in captured.err


def test_delete_reports_the_persisted_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    from shim.records.state import ExitLog, ExitRecord

    fake = _fake_runc(tmp_path)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    bundle = tmp_path / "c3"
    bundle.mkdir()
    when = 1_750_000_000_123_456_789
    record = ExitRecord(container_id="c3", exec_id="", pid=777, exit_status=3, exited_at_ns=when)
    exits = ExitLog(str(bundle))
    exits.record(record)
    exits.close()
    argv = ["shim", "-namespace", "ns", "-id", "c3", "-bundle", str(bundle), "delete"]
    assert cli.main(argv) == 0
    resp = shim_pb2.DeleteResponse.FromString(capfdbinary.readouterr().out)
    assert (resp.pid, resp.exit_status) == (777, 3)
    assert resp.exited_at.seconds * 10**9 + resp.exited_at.nanos == when


class _Exited(Exception):
    def __init__(self, how: str, code: int) -> None:
        super().__init__(how, code)
        self.how, self.code = how, code


@pytest.mark.parametrize(
    ("args", "how"),
    [
        (["-namespace", "ns", "-id", "c1", "start"], "os._exit"),
        (["-namespace", "ns", "-id", "c1", "delete"], "os._exit"),
        (["-namespace", "ns", "-id", "c1"], "sys.exit"),  # the daemon: atexit must run
        (["-bogus"], "sys.exit"),
    ],
)
def test_run_skips_finalization_only_for_start_and_delete(
    args: list[str], how: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    def fake_main() -> int:
        sys.stdout.write("unix:///run/x")  # unflushed: run() must flush it
        return 3

    def os_exit(code: int) -> None:
        raise _Exited("os._exit", code)

    def sys_exit(code: int) -> None:
        raise _Exited("sys.exit", code)

    monkeypatch.setattr(sys, "argv", ["shim", *args])
    monkeypatch.setattr(cli, "main", fake_main)
    monkeypatch.setattr(os, "_exit", os_exit)
    monkeypatch.setattr(sys, "exit", sys_exit)
    with pytest.raises(_Exited) as exc:
        cli.run()
    assert (exc.value.how, exc.value.code) == (how, 3)
    if how == "os._exit":
        assert capfd.readouterr().out == "unix:///run/x"


@pytest.mark.parametrize(
    "args",
    [
        ["-namespace", "ns", "-id", "c1", "-address", "/a", "start"],
        ["-namespace", "ns", "-id", "c1", "start", "extra"],
        ["-namespace", "", "-id", "c1", "start"],
        ["-id", "c1", "start"],
        ["-namespace", "ns", "-id", "../x", "start"],
        ["-namespace", "ns", "-id", ".", "start"],
        ["-namespace", "ns", "-id", "c1", "-v", "start"],
        ["-namespace", "ns", "-id", "c1", "-info", "start"],
        ["-namespace", "ns", "-id", "c1", "delete"],
        ["-namespace", "ns", "-id", "", "start"],
    ],
)
def test_runs_start_agrees_with_main(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    # The template runs `start` for what runs_start() accepts, and leaves the rest to
    # main(): the two must agree on which command lines reach the start action. (No
    # command line without an action here: main() would run a daemon in this process;
    # `-id start` is in test_template.py.)
    import shim.boot.start

    reached: list[str] = []

    def action(name: str) -> Callable[[flags.Options], int]:
        def run(opts: flags.Options) -> int:
            reached.append(name)
            return 0

        return run

    monkeypatch.setattr(shim.boot.start, "run_start", action("start"))
    monkeypatch.setattr(delete, "run_delete", action("delete"))
    monkeypatch.setattr(cli, "run_info", lambda: 0)
    assert parse_flags(args).action
    cli.main(["shim", *args])
    capsysbinary.readouterr()
    assert flags.runs_start(parse_flags(args)) is (reached == ["start"])
