"""shim/boot/quickstart.py, the `start` client side: its request format, its imports, and
what it does when no template (or something else) answers. The template's side is
in test_template.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.boot import quickstart, rendezvous
from shim.boot.quickstart import Request
from tests.support.imports import printed_by_isolated

KEY = "q" * 24


def test_request_round_trip() -> None:
    req = Request(
        [b"/bin/shim", b"-id", b"c\xff1", b"start"],
        [b"A=1", b"EMPTY=", b"EQ=a=b", b"BYTES=\xfe"],
        b"/run/bundle dir",
        0o027,
        4242,
    )
    back = Request.decode(req.encode())
    assert back.argv == req.argv
    assert back.env == req.env
    assert (back.cwd, back.umask, back.parent) == (b"/run/bundle dir", 0o027, 4242)
    assert back.str_argv()[2] == "c\udcff1"
    assert back.environ() == {"A": "1", "EMPTY": "", "EQ": "a=b", "BYTES": "\udcfe"}
    # os.environ decodes the same bytes the same way.
    assert os.fsencode(back.environ()["BYTES"]) == b"\xfe"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"fork\0/b\x0018\x001\x001\0x",
        b"start\0/b\x0018\x001",
        b"start\0relative\x0018\x001\x001\0x",
        b"start\0/b\x0018\x001\x000",
        b"start\0/b\x0018\x001\x003\0x",
        b"start\0/b\x00x\x001\x001\0x",
        b"start\0/b\x0018\x001\x001\0x\0NOEQUALS",
    ],
)
def test_malformed_requests_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        Request.decode(data)


def test_the_quick_path_imports_builtins_only() -> None:
    """`os` alone costs ~1.2 ms; the client needs nothing from disk but itself and what
    it shares with the template (shim.boot.rendezvous, builtins only too)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(quickstart.__file__)))
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        f"sys.path.append({root!r})\n"
        "import shim.boot.quickstart as q\n"
        "q.install_key(sys.executable, q.package_root())\n"
        "q.handoff([b'x'], '/nonexistent', 'k')\n"
        "print(' '.join(sorted(set(sys.modules) - before)))\n"
    )
    loaded = printed_by_isolated(code)
    assert loaded - set(sys.builtin_module_names) == {
        "shim",
        "shim.boot",
        "shim.boot.quickstart",
        "shim.boot.rendezvous",
    }


def test_package_root_holds_the_packages() -> None:
    root = quickstart.package_root()
    assert os.path.isabs(root)
    for package in ("shim", "protocol"):
        assert os.path.isfile(os.path.join(root, package, "__init__.py"))


def test_install_key_tells_installs_apart() -> None:
    a = quickstart.install_key("/usr/bin/python3", "/opt/a")
    assert a == quickstart.install_key("/usr/bin/python3", "/opt/a")
    assert len(a) == 24
    assert a != quickstart.install_key("/usr/bin/python3", "/opt/b")
    assert a != quickstart.install_key("/usr/local/bin/python3", "/opt/a")


@pytest.fixture
def tdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pyshim-q-", dir="/tmp"))  # sun_path: 108 bytes
    os.chmod(d, 0o700)
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def test_no_template_means_start_runs_here(tdir: Path) -> None:
    assert quickstart.handoff([b"x", b"start"], str(tdir), KEY) is None
    assert quickstart.handoff([b"x", b"start"], str(tdir / "missing"), KEY) is None


def test_a_directory_others_can_write_is_not_used(tdir: Path) -> None:
    with _server(tdir, "hang") as (_, accepted):
        os.chmod(tdir, 0o777)
        try:
            assert quickstart.handoff([b"x", b"start"], str(tdir), KEY) is None
        finally:
            os.chmod(tdir, 0o700)
        time.sleep(0.1)
        assert not accepted.exists()


class _server:
    """A stand-in template at the link path, in a child process: ``hang`` never answers,
    ``garbage`` answers what no template says, ``handed`` passes the connection to a
    grandchild (as to a spare) that answers "1" once the template is killed, ``taken``
    says TAKEN and passes it to a grandchild that answers "1" after 0.5 s, ``busy``
    keeps a core busy for 0.8 s, then answers "1"."""

    def __init__(self, tdir: Path, mode: str) -> None:
        self.path = quickstart.link_path(str(tdir), KEY)
        self.accepted = tdir / "accepted"
        self.mode = mode
        self.pid = 0

    def __enter__(self) -> tuple[int, Path]:
        ready_r, ready_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                # Made here: SO_PEERCRED names the process that listened.
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                sock.bind(self.path)
                sock.listen()
                os.write(ready_w, b"r")
                conn, _ = sock.accept()
                conn.recv(1 << 20)
                self.accepted.touch()
                if self.mode == "garbage":
                    conn.send(b"not a status")
                elif self.mode == "taken":
                    conn.send(quickstart.TAKEN)
                elif self.mode == "busy":
                    until = time.monotonic() + 0.8
                    while time.monotonic() < until:
                        pass
                    conn.send(b"1")
                if self.mode in ("handed", "taken") and os.fork() == 0:
                    if self.mode == "handed":
                        # Answers once the template that handed it the request is
                        # retired (killed: this one is re-parented), at most 30 s on.
                        template = os.getppid()
                        until = time.monotonic() + 30
                        while os.getppid() == template and time.monotonic() < until:
                            time.sleep(0.01)
                    else:
                        time.sleep(0.5)
                    conn.send(b"1")
                    os._exit(0)
                time.sleep(60)
            finally:
                os._exit(0)
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"r"
        os.close(ready_r)
        return self.pid, self.accepted

    def __exit__(self, *exc: object) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _stdio() -> tuple[int, int, int]:
    return (os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


def test_a_template_that_handed_the_request_on_is_not_retired(tdir: Path) -> None:
    # TAKEN: the template answered in time; the spare gets the longer timeout.
    stdio = _stdio()
    try:
        with _server(tdir, "taken") as (pid, _):
            code = quickstart.handoff([b"x", b"start"], str(tdir), KEY, stdio, timeout=0.3)
            assert code == 1  # what the spare answered, 0.5 s later
            assert os.path.exists(f"/proc/{pid}")
            assert os.path.lexists(quickstart.link_path(str(tdir), KEY))
    finally:
        os.close(stdio[0])
        os.close(stdio[1])


def test_a_busy_template_is_waited_for_not_retired(tdir: Path) -> None:
    # Runnable past the reply timeout (starved of a core, here spinning on one): not
    # wedged, so neither killed nor unlinked, and its answer is the start's.
    stdio = _stdio()
    try:
        with _server(tdir, "busy") as (pid, _):
            code = quickstart.handoff([b"x", b"start"], str(tdir), KEY, stdio, timeout=0.3)
            assert code == 1
            assert os.path.exists(f"/proc/{pid}")
            assert os.path.lexists(quickstart.link_path(str(tdir), KEY))
    finally:
        os.close(stdio[0])
        os.close(stdio[1])


def test_busy_tells_a_running_process_from_a_blocked_one() -> None:
    assert rendezvous.busy(os.getpid())  # running this very line
    assert not rendezvous.busy(0x7FFFFFF0)  # no such process
    # A command name with ") R " in it: the state is read after the last ")".
    code = "open('/proc/self/comm', 'w').write('x) R (y'); import time; time.sleep(60)"
    sleeper = subprocess.Popen([sys.executable, "-c", code])
    try:
        until = time.monotonic() + 20
        while True:  # until it has its name and sleeps (S), on a loaded machine too
            with open(f"/proc/{sleeper.pid}/stat", "rb") as f:
                if b" (x) R (y) S " in f.read():
                    break
            assert time.monotonic() < until, "the child never slept under its name"
            time.sleep(0.01)
        assert not rendezvous.busy(sleeper.pid)  # blocked, as a wedged template is
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("mode", ["hang", "garbage", "handed"])
def test_a_template_that_does_not_answer_is_retired(tdir: Path, mode: str) -> None:
    stdio = _stdio()
    try:
        with _server(tdir, mode) as (pid, accepted):
            t0 = time.monotonic()
            code = quickstart.handoff([b"x", b"start"], str(tdir), KEY, stdio, timeout=0.3)
            elapsed = time.monotonic() - t0
            assert accepted.exists()
            if mode == "garbage":
                # Not this protocol: nothing of ours has the request.
                assert code is None
                assert os.path.exists(f"/proc/{pid}")
                return
            # Killed, so that it can hand nothing over any more; its link is gone.
            _, status = os.waitpid(pid, 0)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            assert not os.path.lexists(quickstart.link_path(str(tdir), KEY))
            if mode == "hang":
                assert code is None and elapsed < 5  # nobody holds the request
            else:
                assert code == 1 and elapsed >= 0.3  # what the holder answered
    finally:
        os.close(stdio[0])
        os.close(stdio[1])
