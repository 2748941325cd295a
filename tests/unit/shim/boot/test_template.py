"""The shim template (shim/boot/template.py): fork protocol, the forked daemon's process
state, fallbacks, and start's use of it. Real forks and sockets; the daemon's main is
replaced by a probe that reports what it sees."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shim.boot import quickstart, rendezvous, start, template, templateclient
from shim.boot.flags import parse_flags
from shim.sys import ksm
from shim.sys.procfs import stat_fields
from tests.support.template import spare_pids

KEY = "k" * 24


def _probe_main(argv: list[str] | None = None) -> int:
    """Stands in for shim.boot.cli.main in the forked daemon: record the process state."""
    assert argv is not None
    fd3 = os.fstat(3)
    with open(f"/proc/{os.getpid()}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/self/status") as f:
        status = dict(line.split(":\t", 1) for line in f if ":\t" in line)
    umask = os.umask(0)
    with socket.socket(fileno=os.dup(3)) as fd3_sock:
        fd3_name = fd3_sock.getsockname()
        fd3_listening = fd3_sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    info = {
        "fd3_name": fd3_name,
        "fd3_listening": bool(fd3_listening),
        "ksm_pending": ksm._mark_pending,
        "pid": os.getpid(),
        "ppid": int(fields[1]),
        "pgid": os.getpgrp(),
        "sid": os.getsid(0),
        "cwd": os.getcwd(),
        "argv": argv,
        "sys_argv": sys.argv,
        "env": dict(os.environ),
        "umask": umask,
        "fd3_ino": fd3.st_ino,
        "fd3_cloexec": not os.get_inheritable(3),
        "fds": [fd for fd in range(256) if _is_open(fd)],
        "fd_targets": {fd: _fd_target(fd) for fd in range(4, 256) if _is_open(fd)},
        "cmdline": Path("/proc/self/cmdline").read_text().split("\0")[:-1],
        "environ_has": f"PROBE_MARK={os.environ.get('PROBE_MARK')}".encode()
        in Path("/proc/self/environ").read_bytes().split(b"\0"),
        "comm": Path("/proc/self/comm").read_text().strip(),
        "sigblk": status["SigBlk"].strip(),
        "sigint": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
        "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
        "sigpipe_ignored": signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN,
        "sigchld_default": signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL,
    }
    out = os.environ["PROBE_OUT"]
    with open(out + ".tmp", "w") as f:
        json.dump(info, f)
    os.rename(out + ".tmp", out)
    return 0


def _fd_target(fd: int) -> str:
    """What fd is, with "(cloexec)" appended when it is close-on-exec."""
    target = os.readlink(f"/proc/self/fd/{fd}")
    return f"{target} (cloexec)" if not os.get_inheritable(fd) else target


def _only_libuv_signal_pipe(targets: dict[str, str]) -> bool:
    """No fds beyond 0-3 but libuv's process-wide signal lock pipe (both ends, CLOEXEC).

    The spare's rehearsal runs an event loop; libuv opens that pipe with its first loop
    and never closes it, as the daemon's own first loop would.
    """
    if not targets:
        return True
    values = list(targets.values())
    return (
        len(values) == 2
        and values[0] == values[1]
        and values[0].startswith("pipe:[")
        and values[0].endswith("] (cloexec)")
    )


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _cloexec(pid: int, fd: int) -> bool:
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return bool(int(line.split()[1], 8) & os.O_CLOEXEC)
    raise AssertionError(f"no flags in /proc/{pid}/fdinfo/{fd}")


def _exited(pid: int) -> bool:
    """Gone, or a zombie its (new) parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _until(cond: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def _spare(tdir: Path, other_than: int = 0) -> int:
    """The template's idle spare (waiting for it to be forked)."""
    found: list[int] = []

    def ready() -> bool:
        found[:] = [pid for pid in spare_pids(tdir) if pid != other_than and not _exited(pid)]
        return len(found) == 1

    _until(ready, "exactly one spare")
    return found[0]


def _no_spare(serve: Running) -> int:
    """Kill the idle spare; its pid. A spare that died idle is replaced only after the
    next request, which the template serves with a fork of its own."""
    idle = _spare(serve.directory)
    os.kill(idle, signal.SIGKILL)
    _until(lambda: _exited(idle), "the spare to die")
    time.sleep(0.05)  # for the template to read the EOF
    return idle


def _wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{path} never appeared")
        time.sleep(0.01)


class Running:
    def __init__(self, pid: int, directory: Path, key: str) -> None:
        self.pid = pid
        self.directory = directory
        self.key = key

    @property
    def socket(self) -> Path:
        return Path(templateclient.socket_path(str(self.directory), self.key))

    def exited(self, timeout: float = 5.0) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return status
            time.sleep(0.01)
        return None


@pytest.fixture
def tdir() -> Iterator[Path]:
    # Short: unix socket paths are limited to 108 bytes.
    d = Path(tempfile.mkdtemp(prefix="pyshim-t-", dir="/tmp"))
    os.chmod(d, 0o700)
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def serve(tdir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Running]:
    """A template serving tdir: a fork of this test process with a probe for main."""
    monkeypatch.setattr(template, "preload", lambda: None)
    monkeypatch.setenv("PROBE_OUT", str(tmp_path / "probe.json"))
    # So tests.support.template finds this template's spare.
    monkeypatch.setenv(rendezvous.DIR_ENV, str(tdir))
    started: list[Running] = []

    def launch(key: str = KEY) -> Running:
        # Computed keys must agree with the one we serve under.
        monkeypatch.setattr(template, "code_key", lambda: key)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = template.serve(str(tdir), key, main=_probe_main)
            finally:
                os._exit(code)
        running = Running(pid, tdir, key)
        started.append(running)
        _wait_for(running.socket)
        return running

    first = launch()
    first.launch = launch  # type: ignore[attr-defined]
    yield first
    for running in started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(running.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(running.pid, 0)
    # Spares exit on their own once the template is gone.
    _until(lambda: not spare_pids(tdir), "the spares to exit")


@pytest.fixture
def listener(tdir: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tdir / "shim.sock"))
    sock.listen()
    yield sock
    sock.close()


@pytest.mark.parametrize("spare", [True, False], ids=["spare", "no-spare"])
def test_forked_daemon_looks_like_a_reexec(
    serve: Running,
    listener: socket.socket,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    spare: bool,
) -> None:
    idle = _spare(serve.directory) if spare else _no_spare(serve)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    monkeypatch.chdir(bundle)
    monkeypatch.setenv("PROBE_MARK", "m1")
    argv = ["/x/containerd-shim-pyshim-v1", "-namespace", "ns", "-id", "c1", "-address", "/a"]
    old = os.umask(0o027)
    try:
        forked = templateclient.fork_daemon(argv, listener, directory=str(serve.directory), key=KEY)
    finally:
        os.umask(old)
    assert forked is not None
    assert (forked.pid == idle) == spare
    probe = tmp_path / "probe.json"
    time.sleep(0.1)
    assert not probe.exists(), "the daemon must wait for go()"
    forked.go()
    _wait_for(probe)
    info = json.loads(probe.read_text())
    assert info["pid"] == forked.pid
    # Double fork: neither the template nor its intermediate child is the parent.
    assert info["ppid"] not in (serve.pid, os.getpid())
    assert info["pgid"] == info["pid"]
    assert info["sid"] not in (info["pid"], os.getsid(0), os.getsid(serve.pid))
    assert info["cwd"] == str(bundle)
    assert info["argv"] == argv
    assert info["sys_argv"] == argv
    assert info["env"]["PROBE_MARK"] == "m1"
    assert info["env"] == {**os.environ}
    assert info["umask"] == 0o027
    assert info["fd3_ino"] == os.fstat(listener.fileno()).st_ino
    assert info["fds"][:4] == [0, 1, 2, 3]
    assert _only_libuv_signal_pipe(info["fd_targets"]), info["fd_targets"]
    assert info["cmdline"] == argv
    assert info["environ_has"]
    assert info["comm"] == "containerd-shim"
    assert int(info["sigblk"], 16) == 0
    assert info["sigint"] and info["sigterm_default"] and info["sigpipe_ignored"]
    assert info["sigchld_default"]
    # The template keeps serving, and has a new spare once the hand-over is over.
    assert serve.exited(timeout=0.05) is None
    assert _spare(serve.directory, other_than=idle) != forked.pid


_TAKE_ENVIRONMENT = """
import json, os, subprocess, sys
sys.path.insert(0, sys.argv[1])
from shim.boot import template
target = json.loads(sys.argv[2])
template._take_environment(target)
child = subprocess.run(["/usr/bin/env", "-0"], capture_output=True, check=True).stdout
inherited = dict(e.split("=", 1) for e in child.decode().split("\\0") if e)
print(json.dumps({"environ": dict(os.environ), "inherited": inherited}))
"""


def test_take_environment_leaves_exactly_the_new_one_for_python_and_children() -> None:
    # Only what differs is written (shim/boot/template.py): what is the same, changed,
    # added and removed must all end up as the new environment, in os.environ and in
    # the C environment an exec inherits.
    old = {"SAME": "1", "CHANGED": "old", "REMOVED": "x", "PATH": os.environ["PATH"]}
    new = {"SAME": "1", "CHANGED": "new", "ADDED": "a=b", "PATH": os.environ["PATH"]}
    repo = str(Path(template.__file__).resolve().parents[2])
    res = subprocess.run(
        [sys.executable, "-I", "-c", _TAKE_ENVIRONMENT, repo, json.dumps(new)],
        env=old,
        capture_output=True,
        text=True,
        check=True,
    )
    seen = json.loads(res.stdout)
    assert seen["environ"] == new
    assert seen["inherited"] == new


_AFTER_PRELOAD = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from shim.boot import template
template.preload()
before = set(sys.modules)
from protocol.ttrpc import messages
from shim import daemon
daemon.rehearse()
messages.decode_request(messages.encode_request(messages.RequestMessage("s", "m", b"x")))
pid = os.fork()
if pid == 0:
    os._exit(0)
os.wait4(pid, 0)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_what_every_daemon_runs_imports_nothing_the_template_did_not() -> None:
    # A module imported after the fork is built in every daemon's own memory: the
    # server's request envelope (ttrpc_pb2) and os.wait4's rusage (`resource`, which
    # the C function imports on its first call) were, ~0.3 MB each.
    repo = str(Path(template.__file__).resolve().parents[2])
    res = subprocess.run(
        [sys.executable, "-I", "-c", _AFTER_PRELOAD, repo],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(res.stdout) == []


def test_spare_is_detached_and_idle(serve: Running) -> None:
    pid = _spare(serve.directory)
    # It is listed once it has named itself, a moment before its set-up ends and it
    # blocks in its read. Sleeping alone does not say its set-up is over (it may wait
    # on a page or a lock in between): wait until it sleeps with its CPU time still.
    last: list[bytes] = []

    def settled() -> bool:
        fields = stat_fields(pid)
        now = fields[11] + b"/" + fields[12]
        still = fields[0] == b"S" and last == [now]
        last[:] = [now]
        time.sleep(0.1)
        return still

    _until(settled, "the spare to block in its read")
    fields = stat_fields(pid)
    ppid, pgid, sid = int(fields[1]), int(fields[2]), int(fields[3])
    assert ppid not in (serve.pid, os.getpid())
    assert pgid == pid
    assert sid not in (pid, os.getsid(0))
    # Made niced, but serves at the template's priority.
    assert int(fields[16]) == int(stat_fields(serve.pid)[16])
    assert Path(f"/proc/{pid}/comm").read_text() == "pyshim-spare\n"
    assert Path(f"/proc/{pid}/cmdline").read_bytes().endswith(b"\0spare\0")
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    # stdio (the template's) and its link to the template; not fd 3, the listener's.
    fds = sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
    targets = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds}
    links = [fd for fd in fds[3:] if targets[fd].startswith("socket:")]
    assert fds[:3] == [0, 1, 2] and len(links) == 1 and links[0] != 3
    others = {
        str(fd): targets[fd] + (" (cloexec)" if _cloexec(pid, fd) else "")
        for fd in fds[3:]
        if fd not in links
    }
    assert _only_libuv_signal_pipe(others), others
    # Blocked in a read: no CPU while it waits.
    ticks = int(fields[11]) + int(fields[12])
    time.sleep(0.3)
    later = stat_fields(pid)
    assert int(later[11]) + int(later[12]) == ticks
    assert later[0] == b"S"


def test_spare_exits_with_its_template(serve: Running) -> None:
    pid = _spare(serve.directory)
    os.kill(serve.pid, signal.SIGKILL)
    assert serve.exited() is not None
    _until(lambda: _exited(pid), "the spare to exit")


def test_spare_exits_when_its_template_quits(serve: Running) -> None:
    pid = _spare(serve.directory)
    assert templateclient.stop_templates(str(serve.directory)) == [serve.pid]
    assert serve.exited() == 0
    _until(lambda: _exited(pid), "the spare to exit")


def test_spares_serve_starts_in_a_row(
    serve: Running, tdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    used: list[int] = []
    for i in range(3):
        idle = _spare(serve.directory, other_than=used[-1] if used else 0)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(tdir / f"s{i}.sock"))
        sock.listen()
        out = tmp_path / f"probe{i}.json"
        monkeypatch.setenv("PROBE_OUT", str(out))
        forked = templateclient.fork_daemon(["x"], sock, directory=str(tdir), key=KEY)
        sock.close()
        assert forked is not None
        assert forked.pid == idle
        forked.go()
        _wait_for(out)
        info = json.loads(out.read_text())
        assert info["fds"][:4] == [0, 1, 2, 3]
        assert _only_libuv_signal_pipe(info["fd_targets"]), info["fd_targets"]
        used.append(forked.pid)
    assert len(set(used)) == 3


def test_forked_daemon_survives_template_death(
    serve: Running, listener: socket.socket, tmp_path: Path
) -> None:
    forked = templateclient.fork_daemon(["x"], listener, directory=str(serve.directory), key=KEY)
    assert forked is not None
    os.kill(serve.pid, signal.SIGKILL)
    assert serve.exited() is not None
    time.sleep(0.05)
    assert not _exited(forked.pid), "a spare handed a request must not exit with the template"
    forked.go()
    _wait_for(tmp_path / "probe.json")


def test_abort_means_the_daemon_never_runs(
    serve: Running, listener: socket.socket, tmp_path: Path
) -> None:
    forked = templateclient.fork_daemon(["x"], listener, directory=str(serve.directory), key=KEY)
    assert forked is not None
    forked.abort()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{forked.pid}") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not (tmp_path / "probe.json").exists()


def test_meanwhile_runs_during_the_hand_over(
    serve: Running, listener: socket.socket, tmp_path: Path
) -> None:
    idle = _spare(serve.directory)
    ran: list[int] = []
    forked = templateclient.fork_daemon(
        ["x"], listener, directory=str(serve.directory), key=KEY,
        meanwhile=lambda: ran.append(len(ran)),
    )  # fmt: skip
    assert forked is not None and forked.pid == idle
    assert ran == [0]
    forked.go()
    _wait_for(tmp_path / "probe.json")


def test_meanwhile_failure_propagates_and_the_daemon_never_runs(
    serve: Running, listener: socket.socket, tmp_path: Path
) -> None:
    idle = _spare(serve.directory)
    path = Path(listener.getsockname())

    def fail() -> None:
        raise OSError("address not written")

    with pytest.raises(OSError, match="address not written"):
        templateclient.fork_daemon(
            ["x"], listener, directory=str(serve.directory), key=KEY, meanwhile=fail
        )
    _until(lambda: _exited(idle), "the spare handed the request to exit")
    assert not (tmp_path / "probe.json").exists()
    # Abandoned before or after it sent its pid: either way it removes what `start`
    # bound for it.
    assert not path.exists()
    assert serve.exited(timeout=0.05) is None


def _hand_over_pair() -> tuple[socket.socket, socket.socket]:
    """(the daemon-to-be's end, `start`'s end) of a hand-over connection."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def test_go_is_read_when_start_closed_with_an_answer_unread() -> None:
    # Seen under load: the spare's "0" reached `start` before the template's
    # "taken"; `start` said go and exited with "taken" unread, which resets the
    # connection. The go queued before the reset is still the answer.
    mine, starts = _hand_over_pair()

    def start_says_go_and_leaves_taken_unread() -> None:
        assert starts.recv(16) == b"0"
        starts.send(quickstart.GO)
        mine.send(quickstart.TAKEN)  # the template's copy of the same connection
        starts.close()

    answer = template._await_go(mine, b"0", None, meanwhile=start_says_go_and_leaves_taken_unread)
    assert answer == quickstart.GO


def test_start_gone_without_go_after_a_reset_is_eof() -> None:
    mine, starts = _hand_over_pair()

    def start_leaves_without_go() -> None:
        assert starts.recv(16) == b"0"
        mine.send(quickstart.TAKEN)
        starts.close()

    assert template._await_go(mine, b"0", None, meanwhile=start_leaves_without_go) == b""


def test_meanwhile_is_not_run_without_a_template(
    tdir: Path, listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(templateclient, "spawn_template", lambda d, k: 0)
    ran: list[bool] = []
    got = templateclient.fork_daemon(
        ["x"], listener, directory=str(tdir), key=KEY, meanwhile=lambda: ran.append(True)
    )
    assert got is None
    assert ran == []


def test_daemon_abandoned_by_a_dead_start_removes_the_socket_file(
    serve: Running, listener: socket.socket, tmp_path: Path
) -> None:
    path = Path(listener.getsockname())
    forked = templateclient.fork_daemon(["x"], listener, directory=str(serve.directory), key=KEY)
    assert forked is not None
    # What a SIGKILLed `start` leaves: the hand-over connection closes with no "go",
    # and no `start` is left to unlink what it bound.
    forked.abort()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{forked.pid}") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not (tmp_path / "probe.json").exists()
    assert not path.exists()


def test_abandoned_daemon_leaves_a_socket_file_bound_after_it_alone(
    serve: Running, listener: socket.socket, tmp_path: Path
) -> None:
    path = Path(listener.getsockname())
    forked = templateclient.fork_daemon(["x"], listener, directory=str(serve.directory), key=KEY)
    assert forked is not None
    # A later `start` re-bound the same path: that file is not ours to remove.
    path.unlink()
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(path))
    try:
        forked.abort()
        deadline = time.monotonic() + 5
        while not _exited(forked.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _exited(forked.pid)
        assert path.exists()
    finally:
        other.close()


def test_wrong_key_is_refused(serve: Running, listener: socket.socket, tdir: Path) -> None:
    # A request naming other code must not be served by this template.
    os.link(serve.socket, tdir / ("o" * 24 + ".sock"))
    assert templateclient.fork_daemon(["x"], listener, directory=str(tdir), key="o" * 24) is None
    assert serve.exited(timeout=0.05) is None


def test_new_template_retires_stale_one(serve: Running) -> None:
    stale_spare = _spare(serve.directory)
    newer = serve.launch("n" * 24)  # type: ignore[attr-defined]
    assert serve.exited() is not None
    assert not serve.socket.exists()
    _until(lambda: _exited(stale_spare), "the stale template's spare to exit")
    assert newer.socket.exists()
    assert templateclient.stop_templates(str(serve.directory)) == [newer.pid]
    assert newer.exited() is not None
    assert not newer.socket.exists()


def test_idle_template_exits_with_its_spare(
    serve: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(template.IDLE_ENV, "2")
    idle = serve.launch("i" * 24)  # type: ignore[attr-defined]  # retires the first
    assert serve.exited() is not None
    _until(lambda: spare_pids(idle.directory), "the idle template's spare")
    assert idle.exited(timeout=15) == 0
    assert not idle.socket.exists()
    _until(lambda: not spare_pids(idle.directory), "the idle template's spare to exit")


def test_a_request_restarts_the_idle_wait(serve: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(template.IDLE_ENV, "1.5")
    idle = serve.launch("i" * 24)  # type: ignore[attr-defined]
    for _ in range(3):
        time.sleep(0.7)
        # A request it refuses is still a request.
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.settimeout(5)
            conn.connect(str(idle.socket))
            conn.send(b"{}")
            assert b"bad request" in conn.recv(4096)
    assert idle.exited(timeout=0.05) is None
    assert idle.exited(timeout=10) == 0


@pytest.mark.parametrize(
    ("value", "ms"),
    [(None, 300_000), ("2", 2000), ("0.25", 250), ("0", None), ("inf", None), ("-1", 300_000),
     ("nan", 300_000), ("soon", 300_000)],
)  # fmt: skip
def test_idle_timeout_from_the_environment(value: str | None, ms: int | None) -> None:
    env = {} if value is None else {template.IDLE_ENV: value}
    assert template.idle_timeout_ms(env) == ms


def test_second_template_for_same_key_exits(serve: Running, tdir: Path) -> None:
    # The lock is held: returns at once.
    assert template.serve(str(tdir), KEY, main=_probe_main) == 0
    assert serve.exited(timeout=0.05) is None


def _fake_template(path: str, then: str) -> subprocess.Popen[bytes]:
    """A process serving the template socket ``path``: it accepts one connection
    (``c``) and runs the code ``then``; returned once it listens."""
    fake = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, sys, time\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
            f"s.bind({path!r}); s.listen()\n"
            "print('ready', flush=True)\n"
            "c, _ = s.accept()\n" + then,
        ],
        stdout=subprocess.PIPE,
    )
    assert fake.stdout is not None
    assert fake.stdout.readline() == b"ready\n"
    return fake


def test_wedged_template_is_replaced(tdir: Path, listener: socket.socket) -> None:
    """Accepts but never answers: start gives up after the timeout and kills it."""
    path = templateclient.socket_path(str(tdir), KEY)
    fake = _fake_template(path, "time.sleep(60)\n")
    try:
        t0 = time.monotonic()
        got = templateclient.fork_daemon(["x"], listener, directory=str(tdir), key=KEY, timeout=0.3)
        assert got is None
        # Asleep, it is retired at the first check (a loaded machine may take a few).
        assert time.monotonic() - t0 < 0.3 * (1 + rendezvous.BUSY_ROUNDS)
        assert fake.wait(timeout=5) == -signal.SIGKILL
        assert not os.path.exists(path)
    finally:
        fake.kill()
        fake.wait()


def test_busy_template_is_waited_for(tdir: Path, listener: socket.socket) -> None:
    """Runnable past the timeout (starved of a core; here it spins on one): its answer
    is waited for, and it is neither killed nor unlinked."""
    path = templateclient.socket_path(str(tdir), KEY)
    fake = _fake_template(
        path,
        "c.recv(1 << 20)\n"
        "until = time.monotonic() + 0.8\n"
        "while time.monotonic() < until: pass\n"
        "c.send(b'{\"pid\": 4242}')\n"
        "time.sleep(60)\n",
    )
    try:
        got = templateclient.fork_daemon(["x"], listener, directory=str(tdir), key=KEY, timeout=0.3)
        assert got is not None and got.pid == 4242
        got.go()  # closes the connection
        assert fake.poll() is None
        assert os.path.exists(path)
    finally:
        fake.kill()
        fake.wait()


def test_missing_template_is_spawned_and_start_falls_back(
    tdir: Path, listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawned: list[tuple[str, str]] = []

    def spawn(d: str, k: str) -> int:
        spawned.append((d, k))
        return 0

    monkeypatch.setattr(templateclient, "spawn_template", spawn)
    assert templateclient.fork_daemon(["x"], listener, directory=str(tdir), key=KEY) is None
    assert spawned == [(str(tdir), KEY)]
    # A directory that is not there yet: same.
    assert templateclient.fork_daemon(["x"], listener, directory=str(tdir / "new"), key=KEY) is None
    assert spawned[-1] == (str(tdir / "new"), KEY)


def test_dead_template_socket_means_spawn(
    tdir: Path, listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(templateclient.socket_path(str(tdir), KEY))
    stale.close()  # the file stays, nobody listens: ECONNREFUSED
    spawned: list[str] = []

    def spawn(d: str, k: str) -> int:
        spawned.append(k)
        return 0

    monkeypatch.setattr(templateclient, "spawn_template", spawn)
    assert templateclient.fork_daemon(["x"], listener, directory=str(tdir), key=KEY) is None
    assert spawned == [KEY]


def test_directory_others_can_write_is_not_used(
    tdir: Path, listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.chmod(tdir, 0o733)
    spawned: list[str] = []

    def spawn(d: str, k: str) -> int:
        spawned.append(k)
        return 0

    monkeypatch.setattr(templateclient, "spawn_template", spawn)
    assert templateclient.fork_daemon(["x"], listener, directory=str(tdir), key=KEY) is None
    assert spawned == []


def test_spawn_template_skips_while_one_is_starting(tdir: Path) -> None:
    import fcntl

    fd = os.open(templateclient.lock_path(str(tdir), KEY), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert templateclient.spawn_template(str(tdir), KEY) == 0
    finally:
        os.close(fd)


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYSHIM_TEMPLATE", "0")
    assert not templateclient.enabled()
    assert templateclient.spawn_template("/nonexistent/x", KEY) == 0
    monkeypatch.delenv("PYSHIM_TEMPLATE")
    assert templateclient.enabled()


def test_code_key_follows_the_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for pkg in ("shim", "protocol/ttrpc"):
        (tmp_path / pkg).mkdir(parents=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "shim" / "__pycache__").mkdir()
    monkeypatch.setattr(templateclient, "package_root", lambda: str(tmp_path))
    key = templateclient.code_key()
    assert key == templateclient.code_key() and len(key) == 24
    (tmp_path / "shim" / "__pycache__" / "x.cpython-311.pyc").write_text("compiled")
    (tmp_path / "shim" / "notes.txt").write_text("not code")
    assert templateclient.code_key() == key
    (tmp_path / "protocol" / "ttrpc" / "__init__.py").write_text("# changed\n")
    assert templateclient.code_key() != key


def test_real_code_key_is_cheap(monkeypatch: pytest.MonkeyPatch) -> None:
    # Cheap by construction, not by a stopwatch (which a busy machine defeats): every
    # `start` computes it, so it stats files and never reads one.
    expected = templateclient.code_key()

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"code_key opened {args[0]!r}")

    monkeypatch.setattr("builtins.open", no_reading)
    monkeypatch.setattr(os, "open", no_reading)
    assert templateclient.code_key() == expected


# -- start's use of the template ---------------------------------------------------


class FakeForked:
    def __init__(self, pid: int, log: list[str]) -> None:
        self.pid = pid
        self.log = log

    def go(self) -> None:
        self.log.append("go")

    def abort(self) -> None:
        self.log.append("abort")


def _fake_fork(log: list[str]) -> Callable[..., FakeForked]:
    """fork_daemon as it behaves once the request is sent: ``meanwhile``, then the pid."""

    def fork(
        argv: list[str], sock: socket.socket, meanwhile: Callable[[], object] | None = None
    ) -> FakeForked:
        if meanwhile is not None:
            meanwhile()
            log.append(f"meanwhile, address {os.path.exists('address')}")
        return FakeForked(4242, log)

    return fork


@pytest.fixture
def start_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text("{}")
    monkeypatch.chdir(bundle)
    sdir = tempfile.mkdtemp(prefix="pyshim-s-", dir="/tmp")
    monkeypatch.setattr(start, "SOCKET_DIR", sdir)
    monkeypatch.setattr(start, "_read_stdin", lambda: b"")
    monkeypatch.delenv("SCHED_CORE", raising=False)
    yield bundle
    import shutil

    shutil.rmtree(sdir, ignore_errors=True)


def test_start_uses_the_template_and_says_go_last(
    start_bundle: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    log: list[str] = []
    monkeypatch.setattr(templateclient, "fork_daemon", _fake_fork(log))
    monkeypatch.setattr(start, "raise_oom_score", lambda pid: log.append(f"oom {pid}"))
    monkeypatch.setattr(start, "spawn_daemon", lambda argv, sock: pytest.fail("re-exec"))
    opts = parse_flags(["-namespace", "ns", "-address", "/a.sock", "-id", "c1", "start"])
    assert start.run_start(opts) == 0
    # The address is written while the template hands over, once.
    assert log == ["meanwhile, address True", "oom 4242", "go"]
    out = capfd.readouterr().out
    assert out.startswith("unix://")
    assert (start_bundle / "address").read_text() == out


def test_start_address_failure_while_handing_over_aborts(
    start_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[str] = []
    monkeypatch.setattr(templateclient, "fork_daemon", _fake_fork(log))

    def no_address(directory: str, address: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(start, "write_address", no_address)
    monkeypatch.setattr(start, "spawn_daemon", lambda argv, sock: pytest.fail("re-exec"))
    opts = parse_flags(["-namespace", "ns", "-address", "/a.sock", "-id", "c1", "start"])
    with pytest.raises(OSError, match="disk full"):
        start.run_start(opts)
    assert log == []  # never went on to "go"
    sock_path = start.socket_address("/a.sock", "ns", "c1", start.SOCKET_DIR)
    assert not os.path.exists(sock_path.removeprefix("unix://"))


def test_start_aborts_the_forked_daemon_on_failure(
    start_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[str] = []
    monkeypatch.setattr(templateclient, "fork_daemon", _fake_fork(log))

    def boom(pid: int) -> None:
        raise OSError("oom_score_adj exploded")

    monkeypatch.setattr(start, "raise_oom_score", boom)
    monkeypatch.setattr(start, "_kill", lambda pid: log.append(f"kill {pid}"))
    opts = parse_flags(["-namespace", "ns", "-address", "/a.sock", "-id", "c1", "start"])
    with pytest.raises(OSError, match="exploded"):
        start.run_start(opts)
    assert log == ["meanwhile, address True", "abort"]


def test_start_falls_back_to_reexec(start_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[str] = []
    # A template that could not be asked runs nothing meanwhile.
    monkeypatch.setattr(templateclient, "fork_daemon", lambda argv, sock, meanwhile: None)

    def spawn(argv: list[str], sock: socket.socket) -> int:
        # A re-executed daemon reads the address at start-up.
        assert (start_bundle / "address").read_text().startswith("unix://")
        log.append("spawn")
        return 777

    monkeypatch.setattr(start, "spawn_daemon", spawn)
    monkeypatch.setattr(start, "raise_oom_score", lambda pid: log.append(f"oom {pid}"))
    opts = parse_flags(["-namespace", "ns", "-address", "/a.sock", "-id", "c1", "start"])
    assert start.run_start(opts) == 0
    assert log == ["spawn", "oom 777"]


@pytest.mark.parametrize("env", [{"PYSHIM_TEMPLATE": "0"}, {"SCHED_CORE": "1"}])
def test_start_skips_the_template(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(
        templateclient, "fork_daemon", lambda argv, sock: pytest.fail("template used")
    )
    with socket.socket(socket.AF_UNIX) as sock:
        assert start.fork_from_template(["x"], sock) is None


@pytest.mark.parametrize("setting", [None, "1", "0"])
def test_forked_daemon_is_marked_after_start_only_when_asked(
    serve: Running,
    listener: socket.socket,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    setting: str | None,
) -> None:
    if setting is None:
        monkeypatch.delenv(template.KSM_ENV, raising=False)
    else:
        monkeypatch.setenv(template.KSM_ENV, setting)
    argv = ["/x/containerd-shim-pyshim-v1", "-namespace", "ns", "-id", "c1", "-address", "/a"]
    forked = templateclient.fork_daemon(argv, listener, directory=str(serve.directory), key=KEY)
    assert forked is not None
    forked.go()
    probe = tmp_path / "probe.json"
    _wait_for(probe)
    assert json.loads(probe.read_text())["ksm_pending"] is (setting == "1")


# -- `start` handed whole to the template (shim/boot/quickstart.py) ------------------


@pytest.fixture
def sockdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Where quick starts bind; set before ``serve`` forks the template."""
    d = Path(tempfile.mkdtemp(prefix="pyshim-s-", dir="/tmp"))
    monkeypatch.setattr(start, "SOCKET_DIR", str(d))
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


QUICK_ARGV = ["/x/containerd-shim-pyshim-v1", "-namespace", "ns", "-address", "/a.sock"]


class Quick:
    """One quick start from this process: its status, stdout and stderr."""

    def __init__(self, code: int | None, out: bytes, err: bytes) -> None:
        self.code, self.out, self.err = code, out, err


def _quick(
    tdir: Path,
    bundle: Path,
    args: list[str],
    monkeypatch: pytest.MonkeyPatch,
    stdin: bytes = b"",
) -> Quick:
    monkeypatch.chdir(bundle)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    os.write(in_w, stdin)  # containerd's options or bootstrap params (small: fits the pipe)
    os.close(in_w)
    try:
        key = quickstart.install_key(sys.executable, quickstart.package_root())
        argv = [a.encode() for a in [*QUICK_ARGV, *args]]
        code = quickstart.handoff(argv, str(tdir), key, (in_r, out_w, err_w))
    finally:
        for fd in (in_r, out_w, err_w):
            os.close(fd)
    with os.fdopen(out_r, "rb") as out, os.fdopen(err_r, "rb") as err:
        return Quick(code, out.read(), err.read())


def _quick_request(
    serve: Running, bundle: Path, cid: str, monkeypatch: pytest.MonkeyPatch
) -> socket.socket:
    """A quick start request sent by hand (stdio on /dev/null); the connection."""
    monkeypatch.chdir(bundle)
    key = quickstart.install_key(sys.executable, quickstart.package_root())
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.connect(quickstart.link_path(str(serve.directory), key))
    request = quickstart.Request(
        [a.encode() for a in [*QUICK_ARGV, "-id", cid, "start"]],
        [b"A=1"],
        str(bundle).encode(),
        0o022,
        os.getpid(),
    )
    null = os.open(os.devnull, os.O_RDWR)
    try:
        rendezvous.send_fds(conn, request.encode(), [null, null, null])
    finally:
        os.close(null)
    return conn


def _status(conn: socket.socket) -> bytes:
    """The spare's answer, past the template's TAKEN (which may come before or after)."""
    reply = conn.recv(64)
    return conn.recv(64) if reply == quickstart.TAKEN else reply


def _bundle_dir(tmp_path: Path, name: str, config: str | None = "{}") -> Path:
    bundle = tmp_path / name
    bundle.mkdir()
    if config is not None:
        (bundle / "config.json").write_text(config)
    return bundle


@pytest.mark.parametrize("spare", [True, False], ids=["spare", "no-spare"])
def test_quick_start_runs_in_the_spare_which_becomes_the_daemon(
    sockdir: Path,
    serve: Running,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    spare: bool,
) -> None:
    idle = _spare(serve.directory) if spare else _no_spare(serve)
    bundle = _bundle_dir(tmp_path, "b1")
    monkeypatch.setenv("PROBE_MARK", "q1")
    old = os.umask(0o027)
    try:
        res = _quick(serve.directory, bundle, ["-id", "c1", "start"], monkeypatch)
    finally:
        os.umask(old)
    assert (res.code, res.err) == (0, b"")
    address = start.socket_address("/a.sock", "ns", "c1", str(sockdir))
    assert res.out.decode() == address
    assert (bundle / "address").read_text() == address
    probe = tmp_path / "probe.json"
    _wait_for(probe)
    info = json.loads(probe.read_text())
    assert (info["pid"] == idle) == spare
    assert info["ppid"] not in (serve.pid, os.getpid())
    assert info["pgid"] == info["pid"]
    assert info["cwd"] == str(bundle)
    opts = parse_flags([*QUICK_ARGV[1:], "-id", "c1", "start"])
    expected = start.daemon_argv(opts, QUICK_ARGV[0])
    assert info["argv"] == info["sys_argv"] == info["cmdline"] == expected
    assert info["env"] == {**os.environ}
    assert info["umask"] == 0o027
    assert info["fd3_name"] == address.removeprefix("unix://")
    assert info["fd3_listening"]
    assert info["fds"][:4] == [0, 1, 2, 3]
    assert info["comm"] == "containerd-shim"
    # Nothing of `start`'s stdio stays open in the daemon.
    assert _only_libuv_signal_pipe(info["fd_targets"]), info["fd_targets"]


@pytest.mark.parametrize("spare", [True, False], ids=["spare", "no-spare"])
def test_quick_start_answers_bootstrap_params_like_start(
    sockdir: Path,
    serve: Running,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    spare: bool,
) -> None:
    """containerd 2.3 sends BootstrapParams: the spare answers a BootstrapResult, as
    the ordinary `start` does (tests/unit/test_bootstrap.py)."""
    from protocol.proto.runtime.bootstrap.v1 import bootstrap_pb2

    _ = _spare(serve.directory) if spare else _no_spare(serve)
    params = bootstrap_pb2.BootstrapParams(instance_id="c1", namespace="ns").SerializeToString()
    bundle = _bundle_dir(tmp_path, "b1")
    res = _quick(serve.directory, bundle, ["-id", "c1", "start"], monkeypatch, stdin=params)
    assert (res.code, res.err) == (0, b"")
    address = start.socket_address("/a.sock", "ns", "c1", str(sockdir))
    result = bootstrap_pb2.BootstrapResult.FromString(res.out)
    assert (result.version, result.address, result.protocol) == (3, address, "ttrpc")
    assert (bundle / "address").read_text() == address
    _wait_for(tmp_path / "probe.json")


def test_quick_start_failure_reads_like_start(
    sockdir: Path, serve: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = _bundle_dir(tmp_path, "b1", config=None)
    res = _quick(serve.directory, bundle, ["-id", "c1", "start"], monkeypatch)
    assert res.code == 1 and res.out == b""
    assert res.err.startswith(b"io.containerd.pyshim.v1: ")
    assert b"config.json" in res.err
    assert list(sockdir.iterdir()) == []
    time.sleep(0.1)
    assert not (tmp_path / "probe.json").exists()


@pytest.mark.parametrize(
    "args",
    [["-id", "start"], ["-id", "c1", "-v", "start"], ["-id", "../c", "start"], ["-bogus", "start"]],
    ids=["no-action", "version", "bad-id", "bad-flag"],
)
def test_quick_start_leaves_to_start_what_it_does_not_run(
    sockdir: Path,
    serve: Running,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
) -> None:
    bundle = _bundle_dir(tmp_path, "b1")
    res = _quick(serve.directory, bundle, args, monkeypatch)
    assert (res.code, res.out, res.err) == (None, b"", b"")
    assert list(sockdir.iterdir()) == [] and not (bundle / "address").exists()
    assert serve.exited(timeout=0.05) is None


def test_quick_start_of_a_running_group_prints_its_address(
    sockdir: Path, serve: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = json.dumps({"annotations": {start.GROUP_ANNOTATION: "pod1"}})
    address = start.socket_address("/a.sock", "ns", "pod1", str(sockdir))
    live = socket.socket(socket.AF_UNIX)
    live.bind(address.removeprefix("unix://"))
    live.listen()
    try:
        bundle = _bundle_dir(tmp_path, "b2", config)
        res = _quick(serve.directory, bundle, ["-id", "c2", "start"], monkeypatch)
        assert (res.code, res.out.decode(), res.err) == (0, address, b"")
        assert (bundle / "address").read_text() == address
        time.sleep(0.1)
        assert not (tmp_path / "probe.json").exists()  # no second daemon
        # However slow `start` is to say go after "0", the spare is still there to
        # hear it (a start that finds it gone reports a failure).
        conn = _quick_request(serve, _bundle_dir(tmp_path, "b3", config), "c3", monkeypatch)
        assert _status(conn) == b"0"
        time.sleep(0.3)
        conn.send(quickstart.GO)
        conn.close()
    finally:
        live.close()


def test_quick_start_killed_before_go_leaves_no_daemon(
    sockdir: Path, serve: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = _quick_request(serve, _bundle_dir(tmp_path, "b1"), "c1", monkeypatch)
    assert _status(conn) == b"0"
    path = start.socket_address("/a.sock", "ns", "c1", str(sockdir)).removeprefix("unix://")
    assert os.path.exists(path)
    conn.close()  # what a SIGKILLed `start` does instead of "go"
    _until(lambda: not os.path.exists(path), "the daemon-to-be to remove its socket")
    time.sleep(0.1)
    assert not (tmp_path / "probe.json").exists()


@pytest.fixture
def code_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """What templates forked after this fixture watch instead of the real code."""
    from shim.boot import codewatch

    code = tmp_path / "code"
    code.mkdir()
    (code / "a.py").write_text("")
    monkeypatch.setattr(
        codewatch, "watch_code", lambda root: codewatch.CodeWatch([str(code)], [], [])
    )
    return code


def test_quick_start_declined_by_a_template_whose_code_changed(
    sockdir: Path,
    code_tree: Path,
    serve: Running,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bundle = _bundle_dir(tmp_path, "b1")
    (code_tree / "a.py").write_text("changed = True\n")
    res = _quick(serve.directory, bundle, ["-id", "c1", "start"], monkeypatch)
    assert res.code is None
    # It quits: the next `start` spawns a template of the new code.
    assert serve.exited() is not None
    assert not serve.socket.exists()
    assert list(serve.directory.glob("*.link")) == []
    assert list(sockdir.iterdir()) == []


def test_template_quits_as_soon_as_its_code_changes(code_tree: Path, serve: Running) -> None:
    (link,) = serve.directory.glob("*.link")
    assert os.readlink(link) == serve.socket.name
    assert serve.exited(timeout=0.2) is None
    (code_tree / "b.py").write_text("")  # no request needed: the watch is polled
    assert serve.exited() is not None
    assert not serve.socket.exists() and not link.exists()


# -- daemons that die without removing their socket file --------------------------


def test_quick_start_daemon_dead_without_removing_its_socket_file_has_it_removed(
    sockdir: Path, serve: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _spare(serve.directory)
    bundle = _bundle_dir(tmp_path, "b1")
    res = _quick(serve.directory, bundle, ["-id", "c1", "start"], monkeypatch)
    assert res.code == 0, res.err
    path = Path(res.out.decode().removeprefix("unix://"))
    # The probe stands in for the daemon's main and returns without removing it, as
    # a SIGKILLed daemon would.
    _wait_for(tmp_path / "probe.json")
    _until(lambda: not path.exists(), "the template to remove the dead daemon's socket file")


def _bound_elsewhere(path: Path) -> subprocess.Popen[bytes]:
    """A process listening on ``path`` (it says "ok" once it does)."""
    code = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()\n"
        "print('ok', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ok\n"
    return proc


def _janitor_after_death(path: Path, *, replace: bool) -> bool:
    """A daemon serving ``path`` dies (replaced first by a live one, if asked); whether
    the janitor then found the file gone."""
    import select

    poller = select.poll()
    janitor = template._Janitor(poller)
    daemon = _bound_elsewhere(path)
    successor: subprocess.Popen[bytes] | None = None
    try:
        ino = path.stat().st_ino
        janitor.adopt(b"\0".join([template.SERVING, b"%d" % daemon.pid, b"%d" % ino,
                                  os.fsencode(path)]))  # fmt: skip
        assert len(janitor.watched) == 1
        if replace:
            path.unlink()
            successor = _bound_elsewhere(path)
        daemon.kill()
        daemon.wait()
        ((fd, _),) = poller.poll(10_000)
        janitor.exited(fd)
        assert janitor.watched == {}
        return not path.exists()
    finally:
        for proc in (daemon, successor):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        janitor.close()


def test_janitor_removes_a_dead_daemons_socket_file(tmp_path: Path) -> None:
    assert _janitor_after_death(tmp_path / "s.sock", replace=False)


def test_janitor_leaves_a_socket_file_a_new_daemon_bound_in_its_place(tmp_path: Path) -> None:
    assert not _janitor_after_death(tmp_path / "s.sock", replace=True)


@pytest.mark.parametrize(
    "report", [b"", b"serving", b"serving\0x\0y\0/p", b"other\0%d\0%d\0/p" % (os.getpid(), 1)]
)
def test_janitor_ignores_a_malformed_report(report: bytes) -> None:
    import select

    janitor = template._Janitor(select.poll())
    janitor.adopt(report)
    assert janitor.watched == {}


def test_janitor_removes_the_socket_file_of_a_daemon_dead_before_its_report(
    tmp_path: Path,
) -> None:
    import select

    path = tmp_path / "s.sock"
    daemon = _bound_elsewhere(path)
    ino = path.stat().st_ino
    daemon.kill()
    daemon.wait()
    janitor = template._Janitor(select.poll())
    janitor.adopt(b"\0".join([template.SERVING, b"%d" % daemon.pid, b"%d" % ino,
                              os.fsencode(path)]))  # fmt: skip
    assert janitor.watched == {}
    assert not path.exists()
