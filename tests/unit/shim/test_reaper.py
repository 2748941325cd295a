from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import shim.reaper as reaper_mod
from shim.reaper import Reaper, exit_status
from tests.support.proc import children
from tests.support.reaper import installed_reaper

SH = "/bin/sh"


@pytest.fixture
async def reaper() -> AsyncIterator[Reaper]:
    async with installed_reaper() as r:
        try:
            yield r
        finally:
            # Any child a failing test left behind: kill it and let the reaper collect it.
            for pid in list(r._owned):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(r.wait(pid), 5)


@pytest.fixture(params=["setpriv", "fork"])
def spawn_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through each way ``pdeathsig`` is set: setpriv, and the fork fallback."""
    mode: str = request.param
    if mode == "setpriv":
        # util-linux is essential on Debian: the fast path must be the one taken here.
        assert reaper_mod.setpriv_path() is not None
    else:
        monkeypatch.setattr(reaper_mod, "setpriv_path", lambda: None)
    return mode


def _popen_error(argv: list[str], cwd: str | None = None) -> OSError:
    """What a plain Popen raises for ``argv``: the error spawn() must keep giving."""
    try:
        subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as exc:
        return exc
    raise AssertionError(f"{argv} started")


def _same_error(got: BaseException, want: OSError) -> None:
    assert type(got) is type(want)
    assert isinstance(got, OSError)
    assert (got.errno, got.strerror, got.filename) == (want.errno, want.strerror, want.filename)


def _zombie_children() -> list[int]:
    return [pid for pid, state in children(os.getpid()) if state == "Z"]


def test_exit_status_mapping() -> None:
    assert exit_status(0) == 0
    assert exit_status(3 << 8) == 3
    assert exit_status(signal.SIGKILL) == 137
    assert exit_status(signal.SIGTERM) == 143


async def test_exit_codes_and_signals(reaper: Reaper) -> None:
    ok = reaper.spawn([SH, "-c", "exit 0"])
    three = reaper.spawn([SH, "-c", "exit 3"])
    killed = reaper.spawn([SH, "-c", "kill -9 $$"])
    termed = reaper.spawn(["sleep", "30"])
    os.kill(termed, signal.SIGTERM)
    assert await reaper.wait(ok) == 0
    assert await reaper.wait(three) == 3
    assert await reaper.wait(killed) == 137
    assert await reaper.wait(termed) == 143


async def test_exit_before_wait(reaper: Reaper) -> None:
    pid = reaper.spawn([SH, "-c", "exit 7"])
    # Give the child time to die and the SIGCHLD callback time to reap it.
    for _ in range(200):
        await asyncio.sleep(0.01)
        if pid in reaper._exits:
            break
    assert not Path(f"/proc/{pid}").exists()
    assert await reaper.wait(pid) == 7
    with pytest.raises(ChildProcessError):
        await reaper.wait(pid)


async def test_wait_unknown_pid(reaper: Reaper) -> None:
    with pytest.raises(ChildProcessError):
        await reaper.wait(1)


async def test_many_concurrent_spawns(reaper: Reaper) -> None:
    pids = {reaper.spawn([SH, "-c", f"exit {i % 50}"]): i % 50 for i in range(100)}
    statuses = await asyncio.gather(*(reaper.wait(pid) for pid in pids))
    assert statuses == list(pids.values())
    results = await asyncio.gather(
        *(reaper.run([SH, "-c", f"echo out{i}; echo err{i} >&2; exit {i}"]) for i in range(30))
    )
    for i, res in enumerate(results):
        assert res.status == i
        assert res.output == f"out{i}\nerr{i}\n".encode()
    assert _zombie_children() == []
    assert not reaper._owned and not reaper._exits and not reaper._waiters


async def test_run_input_larger_than_pipe_buffer(reaper: Reaper) -> None:
    data = os.urandom(300_000)
    res = await reaper.run(["wc", "-c"], input=data)
    assert res.status == 0
    assert res.output.split() == [str(len(data)).encode()]


async def test_run_input_not_read(reaper: Reaper) -> None:
    res = await reaper.run([SH, "-c", "exit 4"], input=b"x" * 200_000)
    assert res.status == 4


async def test_run_with_stdio_does_not_capture(reaper: Reaper, tmp_path: Path) -> None:
    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        res = await reaper.run([SH, "-c", "echo hi; echo there >&2"], stdio=(None, fd, fd))
    finally:
        os.close(fd)
    assert res == type(res)(0, b"")
    assert out.read_bytes() == b"hi\nthere\n"
    with pytest.raises(ValueError):
        await reaper.run(["true"], input=b"", stdio=(0, None, None))


async def test_run_returns_when_a_detached_descendant_keeps_output(
    reaper: Reaper, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shim.reaper as mod

    monkeypatch.setattr(mod, "EOF_GRACE_SECONDS", 0.3)
    started = time.monotonic()
    res = await reaper.run([SH, "-c", "echo early; sleep 5 & exit 0"])
    assert res.status == 0
    assert res.output == b"early\n"
    assert time.monotonic() - started < 3


async def test_fds_closed_except_pass_fds(reaper: Reaper, spawn_mode: str) -> None:
    leaked_r, leaked_w = os.pipe()
    kept_r, kept_w = os.pipe()
    os.set_inheritable(leaked_r, True)
    try:
        res = await reaper.run(["ls", "/proc/self/fd"], pass_fds=[kept_r])
    finally:
        for fd in (leaked_r, leaked_w, kept_r, kept_w):
            os.close(fd)
    fds = {int(x) for x in res.output.split()}
    assert res.status == 0
    assert kept_r in fds
    assert leaked_r not in fds and leaked_w not in fds and kept_w not in fds


async def test_spawn_missing_binary(reaper: Reaper, spawn_mode: str) -> None:
    with pytest.raises(FileNotFoundError):
        reaper.spawn(["/nonexistent/binary"])
    assert _zombie_children() == []


async def test_exec_errors_are_those_of_popen(
    reaper: Reaper, spawn_mode: str, tmp_path: Path
) -> None:
    not_executable = tmp_path / "data"
    not_executable.write_text("x")
    cases: list[tuple[list[str], str | None]] = [
        (["no-such-binary-pyshim"], None),  # looked up in PATH
        (["/nonexistent/binary"], None),
        ([str(not_executable)], None),
        ([str(tmp_path)], None),  # a directory
        (["./data"], str(tmp_path)),  # found: relative to cwd, and not executable
        (["./nope"], str(tmp_path)),
        (["true"], str(tmp_path / "missing-cwd")),  # the cwd is what Popen names
        (["./nope"], str(tmp_path / "missing-cwd")),
    ]
    for argv, cwd in cases:
        with pytest.raises(OSError) as info:
            reaper.spawn(argv, cwd=cwd)
        _same_error(info.value, _popen_error(argv, cwd))
    assert _zombie_children() == [] and not reaper._owned


async def test_exec_error_after_the_check_is_mapped_back(
    reaper: Reaper, spawn_mode: str, tmp_path: Path
) -> None:
    # Executable, so it passes the check before setpriv; only exec sees the interpreter
    # missing (as it would a binary removed between the check and the exec).
    script = tmp_path / "script"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(0o755)
    with pytest.raises(OSError) as info:
        if spawn_mode == "setpriv":
            await reaper.run([str(script)])
        else:
            reaper.spawn([str(script)])
    _same_error(info.value, _popen_error([str(script)]))


async def test_child_argv_and_signals(reaper: Reaper, spawn_mode: str) -> None:
    res = await reaper.run(["cat", "/proc/self/cmdline"])
    assert res.output.split(b"\0") == [b"cat", b"/proc/self/cmdline", b""]
    # Python ignores SIGPIPE and SIGXFSZ; a child must start with no signal ignored
    # or blocked, whichever way it was spawned.
    res = await reaper.run(["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"])
    fields = dict(line.split(b":") for line in res.output.splitlines())
    assert int(fields[b"SigIgn"], 16) == 0 and int(fields[b"SigBlk"], 16) == 0


async def test_spawn_options(reaper: Reaper, spawn_mode: str, tmp_path: Path) -> None:
    res = await reaper.run(
        [SH, "-c", 'echo "$FOO $(pwd)"; echo "PPid: $PPID"'],
        cwd=str(tmp_path),
        env={"FOO": "bar", "PATH": os.environ["PATH"]},
    )
    lines = res.output.decode().splitlines()
    assert lines[0] == f"bar {tmp_path}"
    assert lines[1].split()[1] == str(os.getpid())
    pid = reaper.spawn(["sleep", "30"], new_pgroup=True)
    try:
        assert os.getpgid(pid) == pid
    finally:
        os.kill(pid, signal.SIGKILL)
        assert await reaper.wait(pid) == 137
    pid = reaper.spawn(["sleep", "30"])
    try:
        assert os.getpgid(pid) == os.getpgrp()
    finally:
        os.kill(pid, signal.SIGKILL)
        await reaper.wait(pid)


async def test_cancelled_run_leaves_nothing(reaper: Reaper) -> None:
    task = asyncio.ensure_future(reaper.run(["sleep", "0.3"]))
    await asyncio.sleep(0.1)
    (pid,) = reaper._owned
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        await asyncio.sleep(0.02)
        if not reaper._owned:
            break
    assert not reaper._owned and not reaper._exits and not Path(f"/proc/{pid}").exists()


async def test_subscriber_sees_foreign_pids_only(reaper: Reaper) -> None:
    seen: list[tuple[int, int]] = []
    unsubscribe = reaper.subscribe(lambda pid, status: seen.append((pid, status)))

    def broken(pid: int, status: int) -> None:
        raise ZeroDivisionError

    reaper.subscribe(broken)  # a broken subscriber must not stop the others
    # A child we did not spawn with the reaper (as a container init re-parented to us).
    foreign = os.posix_spawn("/bin/sh", [SH, "-c", "exit 9"], os.environ)
    owned = reaper.spawn([SH, "-c", "exit 1"])
    assert await reaper.wait(owned) == 1
    for _ in range(200):
        if seen:
            break
        await asyncio.sleep(0.01)
    assert seen == [(foreign, 9)]
    unsubscribe()
    unsubscribe()
    foreign2 = os.posix_spawn("/bin/sh", [SH, "-c", "exit 2"], os.environ)
    await asyncio.sleep(0.2)
    assert seen == [(foreign, 9)]
    assert not Path(f"/proc/{foreign2}").exists()


async def test_install_reaps_already_dead_children() -> None:
    dead = os.posix_spawn("/bin/sh", [SH, "-c", "exit 5"], os.environ)
    while Path(f"/proc/{dead}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        await asyncio.sleep(0.01)
    r = Reaper()
    seen: list[tuple[int, int]] = []
    r.subscribe(lambda pid, status: seen.append((pid, status)))
    r.install(asyncio.get_running_loop())
    try:
        assert seen == [(dead, 5)]
    finally:
        r.uninstall()


_SUBREAPER_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from shim.sys import syscalls
    from shim.reaper import Reaper

    async def main() -> None:
        syscalls.set_child_subreaper(True)
        r = Reaper()
        r.install(asyncio.get_running_loop())
        seen = []
        got = asyncio.Event()
        def on_exit(pid, status):
            seen.append([pid, status])
            got.set()
        r.subscribe(on_exit)
        # sh forks a subshell and exits at once: the subshell is re-parented to us.
        res = await r.run(["/bin/sh", "-c", "(sleep 0.3; exit 5) >/dev/null 2>&1 & echo $!"])
        grandchild = int(res.output)
        await asyncio.wait_for(got.wait(), 10)
        print(json.dumps({"status": res.status, "grandchild": grandchild, "seen": seen,
                          "ppid_pids": sorted(int(p) for p in os.listdir("/proc")
                              if p.isdigit() and os.path.exists(f"/proc/{p}/stat")
                              and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]
                              == str(os.getpid()))}))
    asyncio.run(main())
    """
)


def test_orphans_reparented_to_a_subreaper_are_reaped() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _SUBREAPER_SCRIPT],
        capture_output=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout)
    assert result["status"] == 0
    assert result["seen"] == [[result["grandchild"], 5]]
    assert result["ppid_pids"] == []


_PDEATHSIG_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, sys
    import shim.reaper as reaper_mod
    from shim.reaper import Reaper

    mode, end = sys.argv[1:]
    if mode == "fork":
        reaper_mod.setpriv_path = lambda: None
    setpriv = reaper_mod.setpriv_path()
    assert (setpriv is None) == (mode == "fork"), setpriv

    async def main() -> None:
        r = Reaper()
        r.install(asyncio.get_running_loop())
        a = r.spawn(["sleep", "60"])
        b = r.spawn(["sleep", "60"], pdeathsig=False)
        if setpriv is not None:
            # Until setpriv execs the command its prctl may not have run yet: the
            # window Reaper.spawn documents. The fork path has none: no wait there.
            while os.readlink(f"/proc/{a}/exe") == os.path.realpath(setpriv):
                await asyncio.sleep(0.001)
        print(a, b, flush=True)
        if end == "exit":
            os._exit(0)
        await asyncio.sleep(60)
    asyncio.run(main())
    """
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("end", ["exit", "sigkill"])
@pytest.mark.parametrize("mode", ["setpriv", "fork"])
def test_pdeathsig_kills_children_when_parent_dies(mode: str, end: str) -> None:
    helper = subprocess.Popen(
        [sys.executable, "-c", _PDEATHSIG_SCRIPT, mode, end],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[3],
    )
    pids: list[int] = []
    try:
        assert helper.stdout is not None
        pids = [int(x) for x in helper.stdout.readline().split()]
        if end == "sigkill":
            helper.kill()
        _, err = helper.communicate(timeout=30)
        assert len(pids) == 2, err.decode()
        with_sig, without = pids
        deadline = time.monotonic() + 5
        while _alive(with_sig) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(with_sig)
        assert _alive(without)
    finally:
        with contextlib.suppress(ProcessLookupError):
            helper.kill()
        helper.wait()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_works_on_uvloop() -> None:
    import uvloop

    async def main() -> list[int]:
        r = Reaper()
        r.install(asyncio.get_running_loop())
        try:
            # The sleep makes the exits arrive while the loop idles in its poll.
            pids = [r.spawn([SH, "-c", f"sleep 0.2; exit {i}"]) for i in range(5)]
            statuses = [await r.wait(pid) for pid in pids]
            res = await r.run([SH, "-c", "echo uv; kill -15 $$"])
            return [*statuses, res.status, len(res.output)]
        finally:
            r.uninstall()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(main()) == [0, 1, 2, 3, 4, 143, 3]


def test_setpriv_without_pdeathsig_is_not_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = reaper_mod.setpriv_path()
    assert real is not None
    old, new = tmp_path / "old", tmp_path / "new"
    for directory in (old, new):
        directory.mkdir()
    # An older setpriv: options it knows, not pdeathsig (whose name may still be a
    # suffix of another string, as "keep-pdeathsig" would be).
    (old / "setpriv").write_bytes(b"\0reuid\0keep-pdeathsig\0")
    (old / "setpriv").chmod(0o755)
    (new / "setpriv").write_bytes(Path(real).read_bytes())
    (new / "setpriv").chmod(0o755)
    reaper_mod.setpriv_path.cache_clear()
    try:
        monkeypatch.setenv("PATH", f"{old}")
        assert reaper_mod.setpriv_path() is None
        reaper_mod.setpriv_path.cache_clear()
        monkeypatch.setenv("PATH", f"{old}:{new}")
        assert reaper_mod.setpriv_path() == str(new / "setpriv")
    finally:
        monkeypatch.undo()
        reaper_mod.setpriv_path.cache_clear()
    assert reaper_mod.setpriv_path() == real
