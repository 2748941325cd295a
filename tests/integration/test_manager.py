"""pyshimd + pyshim CLI + the real shim + runc, end to end.

Each test gets its own run/state dirs under a temp dir and its own pyshimd, stopped by
PID; containers, shims and mounts are removed even when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from google.protobuf.message import Message

from crashtest.images import build_busybox_oci_archive
from manager.apiclient import MANAGER_SERVICE
from protocol.proto.manager.v1 import manager_pb2
from tests.support.manager import CMD_TIMEOUT, PYSHIM, PYSHIMD, Manager, manager_session
from tests.support.manager import wait_for as _wait_for
from tests.support.net import free_port

M = TypeVar("M", bound=Message)

pytestmark = pytest.mark.integration


@pytest.fixture
def manager() -> Iterator[Manager]:
    with manager_session() as m:
        yield m


def test_foreground_run_output_and_exit_codes(manager: Manager) -> None:
    res = manager.cli("run", "--", "echo", "hello")
    assert (res.returncode, res.stdout) == (0, "hello\n"), res.stderr + manager.daemon_log()
    res = manager.cli("run", "--rm", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert res.returncode == 3
    assert sorted(res.stdout.splitlines()) == ["err", "out"]
    # --rm removed the second one; the first is still listed as exited.
    listed = json.loads(manager.ok("ps", "--all", "--json"))
    assert [c["command"] for c in listed] == [["echo", "hello"]]
    assert listed[0]["exited"] is True and listed[0]["exit_status"] == 0


def test_stdin_with_interactive(manager: Manager) -> None:
    res = manager.cli("run", "--rm", "-i", "--", "sh", "-c", "tr a-z A-Z; exit 5", input=b"abc\n")
    assert (res.returncode, res.stdout) == (5, "ABC\n"), res.stderr + manager.daemon_log()


def test_detached_logs_kill_wait_rm(manager: Manager) -> None:
    cid = manager.ok(
        "run", "-d", "--name", "sleeper", "--env", "GREETING=hi", "--", "sh", "-c",
        # pid 1 of a pid namespace ignores SIGTERM unless it handles it.
        "trap 'exit 43' TERM; echo \"$GREETING started\"; sleep 1000 & wait",
    ).strip()  # fmt: skip
    assert len(cid) == 16
    _wait_for(lambda: "hi started" in manager.ok("logs", "sleeper"))
    ps = manager.ok("ps")
    assert "sleeper" in ps and "running" in ps
    dup = manager.cli("run", "-d", "--name", "sleeper", "--", "true")
    assert dup.returncode == 125 and "already in use" in dup.stderr
    busy = manager.cli("rm", "sleeper")
    assert busy.returncode == 125 and "rm -f" in busy.stderr
    manager.ok("kill", "-s", "TERM", "sleeper")
    assert manager.ok("wait", "sleeper").strip() == "43"
    info = manager.inspect("sleeper")
    assert info["status"] == "stopped" and info["exit_status"] == 43
    assert "hi started" in manager.ok("logs", "-f", "sleeper")  # returns: it exited
    manager.ok("rm", "sleeper")
    assert manager.ok("ps", "--all", "--json").strip() == "[]"
    assert not (manager.state_dir / "containers" / cid).exists()
    assert not (manager.run_dir / "bundles" / "pyshim" / cid).exists()


def test_exec_and_force_remove(manager: Manager) -> None:
    manager.ok("run", "-d", "--name", "box", "--", "sleep", "1000")
    res = manager.cli("exec", "box", "--", "sh", "-c", "echo inside $$; exit 4")
    assert res.returncode == 4 and res.stdout.startswith("inside "), res.stderr
    res = manager.cli("exec", "-i", "box", "--", "cat", input=b"piped\n")
    assert (res.returncode, res.stdout) == (0, "piped\n"), res.stderr
    manager.ok("rm", "-f", "box")
    assert manager.ok("ps", "--all", "--json").strip() == "[]"


def test_clear_errors(manager: Manager) -> None:
    for args in (["wait", "ghost"], ["logs", "ghost"], ["kill", "ghost"], ["inspect", "ghost"]):
        res = manager.cli(*args)
        assert res.returncode == 125 and "no such container: ghost" in res.stderr, res.stderr
    # Pulled when missing: from a loopback port nothing listens on (no outside traffic).
    res = manager.cli("run", "127.0.0.1:9/no-such-image:1", "--", "true")
    assert res.returncode == 125 and "Unable to find image" in res.stderr, res.stderr
    assert "pull 127.0.0.1:9/no-such-image:1: 127.0.0.1:9:" in res.stderr, res.stderr
    res = manager.cli("run", "--memory", "huge", "--", "true")
    assert res.returncode == 2


def test_restart_reconnects_and_learns_missed_exits(manager: Manager) -> None:
    manager.ok("run", "-d", "--name", "long", "--", "sleep", "1000")
    manager.ok("run", "-d", "--name", "short", "--", "sh", "-c", "sleep 2; exit 7")
    manager.ok("run", "-d", "--name", "doomed", "--", "sleep", "1000")
    doomed_shim = int(manager.inspect("doomed")["shim_pid"])  # type: ignore[call-overload]
    manager.kill(signal.SIGKILL)
    os.kill(doomed_shim, signal.SIGKILL)  # its shim dies while nobody is listening
    time.sleep(3.5)  # "short" exits while nobody is listening
    manager.start()
    listed = {c["name"]: c for c in json.loads(manager.ok("ps", "--all", "--json"))}
    assert listed["long"]["status"] == "running", manager.daemon_log()
    assert listed["short"]["exited"] is True and listed["short"]["exit_status"] == 7
    assert listed["short"]["exit_reason"] == ""
    assert listed["doomed"]["exited"] is True
    assert "shim is gone" in listed["doomed"]["exit_reason"]
    t0 = time.monotonic()
    assert manager.ok("wait", "short").strip() == "7"
    assert time.monotonic() - t0 < 5
    res = manager.cli("exec", "long", "--", "echo", "still here")
    assert (res.returncode, res.stdout) == (0, "still here\n"), res.stderr
    manager.ok("kill", "long")
    assert manager.ok("wait", "long").strip() == "137"


def test_a_removal_left_unfinished_is_finished_at_the_next_start(manager: Manager) -> None:
    # A removal cut short (pyshimd SIGKILLed while the files went, or one it could not
    # remove: here a mount inside the state dir) left a directory without its record,
    # which no later pyshimd listed nor removed.
    cid = manager.ok("run", "-d", "--name", "pinned", "--", "true").strip()
    assert manager.ok("wait", "pinned").strip() == "0"
    pin = manager.state_dir / "containers" / cid / "pin"
    pin.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "pin", str(pin)], check=True)
    retired = manager.state_dir / "containers" / f".removing-{cid}"
    try:
        manager.ok("rm", "pinned")
        assert json.loads(manager.ok("ps", "--all", "--json")) == []
        assert os.listdir(manager.state_dir / "containers") == [retired.name]
        manager.kill(signal.SIGKILL)
    finally:
        for mounted in (pin, retired / "pin"):
            subprocess.run(["umount", str(mounted)], capture_output=True)
    manager.start()
    assert os.listdir(manager.state_dir / "containers") == []
    assert json.loads(manager.ok("ps", "--all", "--json")) == []
    assert f"container {cid}: removing what a crash left of it" in manager.daemon_log()


def test_killed_shim_is_noticed(manager: Manager) -> None:
    manager.ok("run", "-d", "--name", "victim", "--", "sleep", "1000")
    shim_pid = int(manager.inspect("victim")["shim_pid"])  # type: ignore[call-overload]
    assert shim_pid > 0
    os.kill(shim_pid, signal.SIGKILL)
    res = manager.cli("wait", "victim")
    assert res.returncode == 0
    assert "shim exited unexpectedly" in res.stderr
    info = manager.inspect("victim")
    assert info["status"] == "stopped" and "shim" in str(info["exit_reason"])
    # The container did not survive its shim's cleanup.
    pid = int(info["pid"])  # type: ignore[call-overload]
    assert (
        not Path(f"/proc/{pid}").exists()
        or b"sleep" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    )
    manager.ok("rm", "victim")


def test_image_import_run_and_remove(manager: Manager) -> None:
    archive = build_busybox_oci_archive(manager.root / "bb.tar", ref="docker.io/library/bb:1")
    out = manager.ok("image", "import", str(archive))
    assert out.startswith("docker.io/library/bb:1 sha256:")
    assert "docker.io/library/bb:1" in manager.ok("image", "ls")
    listed = json.loads(manager.ok("image", "ls", "--json"))
    assert [(im["ref"], len(im["layers"])) for im in listed] == [("docker.io/library/bb:1", 1)]
    res = manager.cli("run", "--name", "b1", "bb:1", "--", "sh", "-c", "echo img > /f; cat /f")
    assert (res.returncode, res.stdout) == (0, "img\n"), res.stderr + manager.daemon_log()
    # A second container from the same image sees the image, not b1's writes.
    res = manager.cli("run", "--rm", "bb:1", "--", "sh", "-c", "test ! -e /f")
    assert res.returncode == 0, res.stderr
    busy = manager.cli("image", "rm", "bb:1")
    assert busy.returncode == 125 and "used by a container" in busy.stderr
    manager.ok("rm", "b1")
    manager.ok("image", "rm", "bb:1")
    assert "bb:1" not in manager.ok("image", "ls")


def _pty_session(manager: Manager, argv: list[str], rows: int, cols: int) -> tuple[str, int]:
    from ptyprocess import PtyProcess

    proc = PtyProcess.spawn([PYSHIM, *argv], env=manager.env, dimensions=(rows, cols))
    out = b""
    deadline = time.monotonic() + CMD_TIMEOUT
    try:
        while time.monotonic() < deadline:
            try:
                out += proc.read(4096)
            except EOFError:
                break
        proc.wait()
    finally:
        if proc.isalive():
            proc.kill(signal.SIGKILL)
    return out.decode(errors="replace"), int(proc.exitstatus or 0)


def test_tty_gets_the_terminal_size(manager: Manager) -> None:
    out, status = _pty_session(
        manager, ["run", "--rm", "-t", "-i", "--", "sh", "-c", "tty; stty size; exit 6"], 33, 101
    )
    assert status == 6, out + manager.daemon_log()
    assert "/dev/pts/" in out and "33 101" in out
    manager.ok("run", "-d", "--name", "t", "-t", "--", "sleep", "1000")
    out, status = _pty_session(manager, ["exec", "-t", "t", "--", "stty", "size"], 20, 70)
    assert (status, out.strip()) == (0, "20 70"), out


def test_attach_forwards_stdin_and_returns_the_exit_code(manager: Manager) -> None:
    manager.ok("run", "-d", "-i", "--name", "a", "--", "sh", "-c", "read x; echo got $x; exit 2")
    res = manager.cli("attach", "a", input=b"hello\n")
    assert (res.returncode, res.stdout) == (2, "got hello\n"), res.stderr
    res = manager.cli("attach", "a")
    assert res.returncode == 125 and "not running" in res.stderr


def test_detached_rm_and_limits(manager: Manager) -> None:
    manager.ok("run", "-d", "--rm", "--", "true")
    _wait_for(lambda: manager.ok("ps", "--all", "--json").strip() == "[]")
    cid = manager.ok("run", "-d", "--memory", "64m", "--cpus", "0.5", "--", "sleep", "1000").strip()
    res = manager.cli("exec", cid, "--", "cat", "/proc/self/cgroup")
    assert res.returncode == 0, res.stderr
    # The memory hierarchy's line on v1, the unified "0::" one on v2 (the VM tier).
    lines = res.stdout.splitlines()
    memory_line = next((ln for ln in lines if ":memory:" in ln), None) or next(
        ln for ln in lines if ln.startswith("0::")
    )
    assert memory_line.endswith(f"/pyshim/{cid}")
    spec = manager.inspect(cid)["spec"]
    assert spec["linux"]["resources"]["memory"] == {"limit": 64 << 20}  # type: ignore[index]


def test_exit_events_are_recorded_once(manager: Manager) -> None:
    """An exit forwarded through the events socket (here via the publish fallback the
    shim may use) is recorded; a later, different exit for the same process is not."""
    from protocol.proto import anyutil, timeutil
    from protocol.proto.events import task_pb2

    cid = manager.ok("run", "-d", "--name", "ev", "--", "sleep", "1000").strip()
    event = task_pb2.TaskExit(container_id=cid, id=cid, pid=1, exit_status=42)
    event.exited_at.CopyFrom(timeutil.timestamp_now())
    res = subprocess.run(
        [PYSHIMD, "--address", str(manager.run_dir / "pyshimd.sock"), "publish",
         "--topic", "/tasks/exit", "--namespace", "pyshim"],
        input=anyutil.pack(event).SerializeToString(),
        capture_output=True,
        timeout=CMD_TIMEOUT,
        check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert manager.ok("wait", "ev").strip() == "42"
    shim_pid = int(manager.inspect("ev")["shim_pid"])  # type: ignore[call-overload]
    manager.ok("rm", "-f", "ev")  # the real exit (137) now arrives and is dropped
    assert "ignoring a second exit 137 (already recorded 42)" in manager.daemon_log()
    # rm stopped the container pyshimd believed exited, and its shim with it.
    _wait_for(lambda: not Path(f"/proc/{shim_pid}").exists())


# The quick commands' point (bench/README.md, manager path): they must not load what
# a `pyshim run` cannot afford at every start. Checked on the real commands against
# the real pyshimd, started as the installed `pyshim` is (-IS, launcher's sys.path).
_HEAVY_PROBE = """
import sys
sys.path.extend({paths!r})
from manager.cli import main
rc = main(sys.argv[1:])
heavy = sorted(
    m for m in sys.modules
    if m.split(".")[0] in ("asyncio", "pathlib", "json", "urllib")
    or m.endswith("_pb2")
    or (m.startswith("google.protobuf.") and m != "google.protobuf.message")
)
sys.stderr.write("HEAVY=" + ",".join(heavy) + "\\n")
sys.exit(rc)
"""


def test_commands_import_no_asyncio_protobuf_pathlib_json(manager: Manager) -> None:
    """Every command but exec, attach, pull and run -i/-t: run on the blocking client
    with LiteMessages; json only where JSON is printed (--json, inspect)."""
    from shim.boot.launcher import import_paths

    code = _HEAVY_PROBE.format(paths=import_paths())

    def probe(*args: str) -> tuple[int, str, list[str]]:
        res = subprocess.run(
            [sys.executable, "-IS", "-c", code, *args],
            env=manager.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CMD_TIMEOUT,
        )
        heavy = [ln for ln in res.stderr.splitlines() if ln.startswith("HEAVY=")]
        assert heavy, res.stderr + manager.daemon_log()
        return res.returncode, res.stdout, [m for m in heavy[-1][6:].split(",") if m]

    def light(*args: str, allow: str = "") -> str:
        """The command's output; it worked and loaded nothing heavy but ``allow``."""
        rc, out, heavy = probe(*args)
        assert rc == 0, (args, out, manager.daemon_log())
        assert [m for m in heavy if m.split(".")[0] != allow] == [], args
        if allow:
            assert allow in heavy, args  # (the probe sees it: it is there)
        return out

    rc, out, heavy = probe("run", "--rm", "--network", "none", "--", "sh", "-c", "echo hi; exit 3")
    assert (rc, out, heavy) == (3, "hi\n", [])
    rc, cid, heavy = probe("run", "-d", "--name", "quick", "--", "sleep", "1000")
    assert (rc, heavy) == (0, []) and len(cid.strip()) == 16
    manager.ok("run", "--name", "said", "--network", "none", "--", "echo", "said")

    assert "quick" in light("ps")
    assert "said" in light("ps", "-a")
    assert [c["name"] for c in json.loads(light("ps", "-a", "--json", allow="json"))] == [
        "quick",
        "said",
    ]
    assert json.loads(light("inspect", "quick", allow="json"))["name"] == "quick"
    assert light("logs", "said") == "said\n"
    assert light("logs", "--tail", "1", "-f", "said") == "said\n"
    manager.ok("run", "-d", "--name", "talk", "--network", "none", "--", "sh", "-c",
               "echo a; sleep 1; echo b")  # fmt: skip
    assert light("logs", "-f", "talk") == "a\nb\n"  # followed to its exit, without a loop
    assert light("logs", "-t", "said").endswith("Z said\n")
    assert "sleep 1000" in light("top", "quick")
    assert json.loads(light("top", "--json", "quick", allow="json"))[0]["command"] == "sleep 1000"
    assert "quick" in light("stats", "--no-stream")
    assert json.loads(light("stats", "--no-stream", "--json", allow="json"))[0]["name"] == "quick"
    assert light("image", "ls").startswith("REF")
    assert json.loads(light("image", "ls", "--json", allow="json")) == []
    assert light("volume", "create", "v1") == "v1\n"
    assert light("volume", "ls").splitlines()[1].startswith("v1 ")
    assert json.loads(light("volume", "ls", "--json", allow="json"))[0]["name"] == "v1"
    assert light("volume", "rm", "v1") == "v1\n"
    # (sleep as pid 1 ignores SIGTERM: -t 1 rather than the default 10 s)
    for command in (["pause"], ["unpause"], ["restart", "-t", "1"], ["stop", "-t", "1"], ["start"]):
        assert light(*command, "quick") == "quick\n", command
    assert light("kill", "quick") == ""
    assert light("wait", "quick") == "137\n"
    assert light("rm", "quick", "said", "talk") == "quick\nsaid\ntalk\n"
    # The probe sees what is loaded: a command on the event loop shows asyncio (and
    # still no protobuf: its messages are lite too).
    manager.ok("run", "-d", "--name", "loop", "--network", "none", "--", "sleep", "1000")
    rc, out, heavy = probe("exec", "loop", "--", "echo", "in")
    assert (rc, out) == (0, "in\n") and "asyncio" in heavy
    assert [m for m in heavy if "protobuf" in m or m.endswith("_pb2")] == []


def _reference_json(obj: object) -> str:
    """`--json` as the CLI printed it with protobuf's json_format, before LiteMessages."""
    from google.protobuf.json_format import MessageToDict

    def to_dict(msg: Message) -> dict[str, object]:
        return MessageToDict(
            msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )

    def container(c: manager_pb2.Container) -> dict[str, object]:
        d = to_dict(c)
        if not c.exited:
            d.pop("exited_at", None)
        return d

    if isinstance(obj, manager_pb2.InspectResponse):
        out = container(obj.container)
        out["spec"] = json.loads(obj.spec_json) if obj.spec_json else None
        return json.dumps(out, indent=2) + "\n"
    assert isinstance(obj, list)
    rows = [container(m) if isinstance(m, manager_pb2.Container) else to_dict(m) for m in obj]
    return json.dumps(rows, indent=2) + "\n"


def test_json_output_is_protobufs_json(manager: Manager) -> None:
    """ps/inspect/top/image ls/volume ls --json, byte for byte what MessageToDict of the
    same answers (asked with the generated classes) gives; stats' keys in its order."""
    from protocol.ttrpc.blocking import BlockingClient

    manager.import_busybox("docker.io/library/bb:1")
    manager.ok(
        "run", "-d", "--name", "up", "-v", "data:/data", "-p", f"{free_port()}:80", "--restart",
        "on-failure:3", "bb:1", "--", "sh", "-c", "sleep 1000 & exec sleep 1001",
    )  # fmt: skip
    down = manager.cli("run", "--name", "down", "--network", "none", "--", "sh", "-c", "exit 7")
    assert down.returncode == 7, down.stderr
    sock = BlockingClient.connect(str(manager.run_dir / "pyshimd.sock"), timeout=5)

    def ask(method: str, req: Message, resp: type[M]) -> M:
        return sock.call(MANAGER_SERVICE, method, req, resp)

    try:
        listed = ask("List", manager_pb2.ListRequest(all=True), manager_pb2.ListResponse)
        assert manager.ok("ps", "-a", "--json") == _reference_json(list(listed.containers))
        for name in ("up", "down"):
            req = manager_pb2.InspectRequest(container=name)
            want = _reference_json(ask("Inspect", req, manager_pb2.InspectResponse))
            assert manager.ok("inspect", name) == want
        top = ask("Top", manager_pb2.TopRequest(container="up"), manager_pb2.TopResponse)
        assert manager.ok("top", "--json", "up") == _reference_json(list(top.processes))
        images = ask("ImageList", manager_pb2.ImageListRequest(), manager_pb2.ImageListResponse)
        assert manager.ok("image", "ls", "--json") == _reference_json(list(images.images))
        req_v = manager_pb2.VolumeListRequest()
        volumes = ask("VolumeList", req_v, manager_pb2.VolumeListResponse)
        assert manager.ok("volume", "ls", "--json") == _reference_json(list(volumes.volumes))
        stats = ask("Stats", manager_pb2.StatsRequest(), manager_pb2.StatsResponse)
        (row,) = json.loads(manager.ok("stats", "--no-stream", "--json"))
        (want_row,) = json.loads(_reference_json(list(stats.stats)))
        assert list(row) == [*want_row, "cpu_percent", "memory_percent"]
        assert [type(v) for v in row.values()][: len(want_row)] == [
            type(v) for v in want_row.values()
        ]
    finally:
        sock.close()
