from __future__ import annotations

import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import shim.reaper as reaper_mod
from shim.reaper import Reaper
from shim.task.runtime import Runc, RuncOptions, RuntimeFailure
from tests.support.reaper import installed_reaper

# A stand-in runtime binary: records what it was given, then behaves as FAKE_* says.
_FAKE = """#!/bin/sh
{{
  printf '%s\\n' "$@" > "$FAKE_DIR/argv"
  pwd > "$FAKE_DIR/cwd"
  env > "$FAKE_DIR/env"
  cat > "$FAKE_DIR/stdin"
  for a in "$@"; do
    case "$a" in
      */runc-process*) cp "$a" "$FAKE_DIR/process.json"; stat -c %a "$a" > "$FAKE_DIR/mode";;
    esac
  done
}} </dev/stdin
if [ -n "$FAKE_LOG" ]; then printf '%s\\n' "$FAKE_LOG" >> "{bundle}/log.json"; fi
printf '%s' "$FAKE_OUT"
exit "${{FAKE_STATUS:-0}}"
"""


@pytest.fixture
async def reaper() -> AsyncIterator[Reaper]:
    async with installed_reaper() as r:
        yield r


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    record = tmp_path / "record"
    record.mkdir()
    binary = tmp_path / "fakerunc"
    binary.write_text(_FAKE.format(bundle=bundle))
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("FAKE_DIR", str(record))
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    for var in ("FAKE_LOG", "FAKE_OUT", "FAKE_STATUS"):
        monkeypatch.delenv(var, raising=False)
    return binary, bundle


def _runc(reaper: Reaper, fake: tuple[Path, Path], **opts: Any) -> Runc:
    binary, bundle = fake
    return Runc(reaper, RuncOptions(binary=str(binary), root="/run/x", **opts), "ns1", str(bundle))


def _argv(fake: tuple[Path, Path]) -> list[str]:
    return (fake[0].parent / "record" / "argv").read_text().splitlines()


def _global(fake: tuple[Path, Path]) -> list[str]:
    return ["--root", "/run/x/ns1", "--log", f"{fake[1]}/log.json", "--log-format", "json"]


async def test_create_argv_env_cwd(reaper: Reaper, fake: tuple[Path, Path]) -> None:
    runc = _runc(reaper, fake)
    bundle = str(fake[1])
    await runc.create(
        "c1", pid_file=f"{bundle}/init.pid", console_socket=None, stdio=(None, None, None)
    )
    assert _argv(fake) == [
        *_global(fake),
        "create",
        "--bundle",
        bundle,
        "--pid-file",
        f"{bundle}/init.pid",
        "c1",
    ]
    record = fake[0].parent / "record"
    assert (record / "cwd").read_text().strip() == bundle
    env = (record / "env").read_text()
    assert "NOTIFY_SOCKET" not in env and "FAKE_DIR=" in env
    await runc.create(
        "c2",
        pid_file="/p",
        console_socket="/s.sock",
        stdio=(None, None, None),
        no_pivot=True,
        no_new_keyring=True,
    )
    assert _argv(fake)[6:] == [
        "create",
        "--bundle",
        bundle,
        "--pid-file",
        "/p",
        "--console-socket",
        "/s.sock",
        "--no-pivot",
        "--no-new-keyring",
        "c2",
    ]


async def test_global_options(reaper: Reaper, fake: tuple[Path, Path]) -> None:
    runc = _runc(reaper, fake, systemd_cgroup=True, criu_path="/usr/sbin/criu")
    await runc.start("c1")
    assert _argv(fake) == [
        *_global(fake),
        "--criu",
        "/usr/sbin/criu",
        "--systemd-cgroup",
        "start",
        "c1",
    ]


async def test_simple_commands(reaper: Reaper, fake: tuple[Path, Path]) -> None:
    runc = _runc(reaper, fake)
    cases = [
        (runc.start("c"), ["start", "c"]),
        (runc.kill("c", 15), ["kill", "c", "15"]),
        (runc.kill("c", 9, all=True), ["kill", "--all", "c", "9"]),
        (runc.delete("c"), ["delete", "c"]),
        (runc.delete("c", force=True), ["delete", "--force", "c"]),
        (runc.pause("c"), ["pause", "c"]),
        (runc.resume("c"), ["resume", "c"]),
    ]
    for coro, expected in cases:
        await coro
        assert _argv(fake) == [*_global(fake), *expected]


async def test_exec_process_file(reaper: Reaper, fake: tuple[Path, Path], tmp_path: Path) -> None:
    runc = _runc(reaper, fake)
    process = json.dumps({"args": ["sh"], "terminal": False}).encode()
    await runc.exec("c1", process, pid_file="/b/e1.pid", console_socket=None, stdio=(None,) * 3)
    argv = _argv(fake)
    assert argv[6:8] == ["exec", "--process"]
    process_file = argv[8]
    assert process_file.startswith(f"{tmp_path}/runc-process")
    assert argv[9:] == ["--detach", "--pid-file", "/b/e1.pid", "c1"]
    record = tmp_path / "record"
    assert (record / "process.json").read_bytes() == process + b"\n"
    assert (record / "mode").read_text().strip() == "600"
    assert not os.path.exists(process_file)
    await runc.exec("c1", process, pid_file="/p", console_socket="/s", stdio=(None,) * 3)
    assert _argv(fake)[9:] == ["--console-socket", "/s", "--detach", "--pid-file", "/p", "c1"]


async def test_exec_failure_removes_process_file(
    reaper: Reaper, fake: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_STATUS", "1")
    with pytest.raises(RuntimeFailure):
        await _runc(reaper, fake).exec(
            "c1", b"{}", pid_file="/p", console_socket=None, stdio=(None,) * 3
        )
    assert not list(tmp_path.glob("runc-process*"))


async def test_update_feeds_stdin(reaper: Reaper, fake: tuple[Path, Path]) -> None:
    resources = json.dumps({"pids": {"limit": 10}}).encode()
    await _runc(reaper, fake).update("c1", resources)
    assert _argv(fake)[6:] == ["update", "--resources", "-", "c1"]
    assert (fake[0].parent / "record" / "stdin").read_bytes() == resources + b"\n"


async def test_ps_and_state(
    reaper: Reaper, fake: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    runc = _runc(reaper, fake)
    monkeypatch.setenv("FAKE_OUT", "[15918,42]\n")
    assert await runc.ps("c1") == [15918, 42]
    assert _argv(fake)[6:] == ["ps", "--format", "json", "c1"]
    monkeypatch.setenv("FAKE_OUT", "null")
    assert await runc.ps("c1") == []
    monkeypatch.setenv("FAKE_OUT", "garbage")
    with pytest.raises(RuntimeFailure, match="unable to parse"):
        await runc.ps("c1")
    monkeypatch.setenv("FAKE_OUT", '{"id":"c1","pid":5,"status":"running"}')
    assert (await runc.state("c1"))["status"] == "running"
    assert _argv(fake)[6:] == ["state", "c1"]


async def test_error_from_exit_status(
    reaper: Reaper, fake: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_STATUS", "3")
    monkeypatch.setenv("FAKE_OUT", "boom")
    with pytest.raises(RuntimeFailure) as info:
        await _runc(reaper, fake).ps("c1")
    assert info.value.message == f"{fake[0]} did not terminate successfully: exit status 3: boom"
    assert info.value.status == 3


async def test_error_enriched_from_new_log_lines_only(
    reaper: Reaper, fake: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    log = fake[1] / "log.json"
    log.write_text(
        '{"level":"error","msg":"an old failure","time":"t"}\n'
        '{"level":"warning","msg":"meh","time":"t"}\n'
    )
    runc = _runc(reaper, fake)
    monkeypatch.setenv("FAKE_STATUS", "1")
    with pytest.raises(RuntimeFailure) as info:
        await runc.start("c1")
    # No new error line: fall back to the exit status text, never the old line.
    assert info.value.message.endswith("did not terminate successfully: exit status 1: ")
    monkeypatch.setenv(
        "FAKE_LOG",
        '{"level":"error","msg":"first","time":"t"}\n'
        '{"level":"error","msg":"  runc create failed: container with given ID already exists\\n",'
        '"time":"t"}\nnot json\n{"level":"info","msg":"later info","time":"t"}',
    )
    with pytest.raises(RuntimeFailure) as info:
        await runc.create("c1", pid_file="/p", console_socket=None, stdio=(None,) * 3)
    assert info.value.message == "runc create failed: container with given ID already exists"
    # Plain kill and ps are not enriched (io.md §3.1).
    with pytest.raises(RuntimeFailure) as info:
        await runc.kill("c1", 9)
    assert "did not terminate successfully" in info.value.message
    with pytest.raises(RuntimeFailure) as info:
        await runc.kill("c1", 9, all=True)
    assert info.value.message == "runc create failed: container with given ID already exists"


@pytest.mark.parametrize("setpriv", [True, False])
async def test_missing_binary(
    reaper: Reaper, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setpriv: bool
) -> None:
    # The same message whether setpriv runs in front of the runtime or the shim forks.
    if setpriv:
        assert reaper_mod.setpriv_path() is not None
    else:
        monkeypatch.setattr(reaper_mod, "setpriv_path", lambda: None)
    for binary in (str(tmp_path / "nope"), "pyshim-no-such-runc"):
        runc = Runc(reaper, RuncOptions(binary=binary), "ns", str(tmp_path))
        with pytest.raises(RuntimeFailure) as info:
            await runc.start("c1")
        assert info.value.message == f"exec: {binary!r}: No such file or directory"
        with pytest.raises(RuntimeFailure) as info:
            await runc.create("c1", pid_file="/p", console_socket=None, stdio=(None,) * 3)
        assert info.value.message == f"exec: {binary!r}: No such file or directory"


async def test_only_create_dies_with_the_shim(
    reaper: Reaper, fake: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A create half done when the shim dies is better not done; every other command
    # finishes its work if the shim dies, and skips the setpriv exec in front of it.
    seen: list[tuple[str, bool]] = []
    run = reaper.run

    async def spy(argv: list[str], **kwargs: Any) -> Any:
        seen.append((argv[7], kwargs["pdeathsig"]))
        return await run(argv, **kwargs)

    monkeypatch.setattr(reaper, "run", spy)
    runc = _runc(reaper, fake)
    await runc.create("c", pid_file="/p", console_socket=None, stdio=(None,) * 3)
    await runc.exec("c", b"{}", pid_file="/p", console_socket=None, stdio=(None,) * 3)
    for coro in (runc.start("c"), runc.kill("c", 9), runc.delete("c", force=True)):
        await coro
    await runc.pause("c")
    await runc.resume("c")
    await runc.update("c", b"{}")
    assert seen == [
        ("create", True),
        ("exec", False),
        ("start", False),
        ("kill", False),
        ("delete", False),
        ("pause", False),
        ("resume", False),
        ("update", False),
    ]
