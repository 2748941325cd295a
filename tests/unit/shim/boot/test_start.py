"""The `start` action: address, grouping, socket reuse, address file, daemon spawn."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol import wire
from protocol.proto import anyutil
from protocol.proto.runc import options_pb2
from protocol.proto.runctypes import runc_pb2
from shim.boot import start
from shim.boot.flags import parse_flags
from tests.support.imports import printed_by_isolated

SPEC_HASH = "1edd1a9a40eab4863a4065f09a93cf7db08f16c567337ba3e5937b4636ae16dd"


def test_address_matches_spec_example() -> None:
    addr = start.socket_address("/tmp/spec-ctrd/containerd.sock", "specns", "c1")
    assert addr == f"unix:///run/containerd/s/{SPEC_HASH}"


def test_address_uses_go_path_join() -> None:
    # path.Join cleans: a trailing slash or doubled slashes hash the same.
    a = start.socket_address("/tmp/spec-ctrd/containerd.sock/", "specns", "c1")
    b = start.socket_address("/tmp/spec-ctrd//containerd.sock", "specns", "c1")
    assert a == b == f"unix:///run/containerd/s/{SPEC_HASH}"
    assert start.socket_address("/x", "ns", "k", "/other").startswith("unix:///other/")


@pytest.mark.parametrize(
    ("parts", "joined"),
    [
        (("/a", "b", "c"), "/a/b/c"),
        (("a", "", "c"), "a/c"),
        (("/a/../b", "c"), "/b/c"),
        (("/..", "x"), "/x"),
        (("..", "x"), "../x"),
        (("", ""), ""),
        (("./", "."), "."),
    ],
)
def test_go_path_join(parts: tuple[str, ...], joined: str) -> None:
    assert start._go_path_join(*parts) == joined


def _config(tmp_path: Path, annotations: dict[str, str] | None) -> str:
    spec: dict[str, object] = {"ociVersion": "1.0.2"}
    if annotations is not None:
        spec["annotations"] = annotations
    path = tmp_path / "config.json"
    path.write_text(json.dumps(spec))
    return str(path)


@pytest.mark.parametrize(
    ("annotations", "key"),
    [
        (None, "c1"),
        ({}, "c1"),
        ({"io.kubernetes.cri.sandbox-id": "sb"}, "sb"),
        ({"io.containerd.pyshim.v1.group": "g1"}, "g1"),
        ({"io.containerd.pyshim.v1.group": "g1", "io.kubernetes.cri.sandbox-id": "sb"}, "g1"),
        ({"io.containerd.pyshim.v1.group": ""}, "c1"),
        ({"io.containerd.runc.v2.group": "other-shims-key"}, "c1"),
    ],
)
def test_grouping_key(tmp_path: Path, annotations: dict[str, str] | None, key: str) -> None:
    assert start.grouping_key(_config(tmp_path, annotations), "c1") == key


def test_grouping_key_needs_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        start.grouping_key(str(tmp_path / "config.json"), "c1")


# -- socket --------------------------------------------------------------------------


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "s" / "shim.sock")
    os.makedirs(os.path.dirname(path))
    yield path
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def test_bind_creates_private_listening_socket(sock_path: str) -> None:
    listener = start.bind_or_find(sock_path)
    assert listener is not None
    with contextlib.closing(listener):
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(sock_path)


def test_answering_socket_means_existing_shim(sock_path: str) -> None:
    first = start.bind_or_find(sock_path)
    assert first is not None
    with contextlib.closing(first):
        inode = os.stat(sock_path).st_ino
        assert start.bind_or_find(sock_path) is None
        assert os.stat(sock_path).st_ino == inode


def test_stale_socket_is_replaced(sock_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock_path)
    stale.close()  # the file stays, nobody listens: a dead shim's socket
    listener = start.bind_or_find(sock_path)
    assert listener is not None
    with contextlib.closing(listener), socket.socket(socket.AF_UNIX) as c:
        c.connect(sock_path)


def test_other_bind_errors_propagate(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        start.bind_or_find(str(tmp_path / "missing-dir" / "s"))


def test_write_address(tmp_path: Path) -> None:
    (tmp_path / ".address").write_text("left by a crash")
    start.write_address(str(tmp_path), "unix:///run/containerd/s/abc")
    assert (tmp_path / "address").read_bytes() == b"unix:///run/containerd/s/abc"
    assert not (tmp_path / ".address").exists()
    start.write_address(str(tmp_path), "unix:///x")
    assert (tmp_path / "address").read_text() == "unix:///x"


# -- stdin ---------------------------------------------------------------------------


def test_stdin_empty() -> None:
    opts = start.parse_stdin(b"", container_id="c1", namespace="ns")
    assert (opts.shim_cgroup, opts.socket_dir) == ("", None)


def test_stdin_runc_options_shim_cgroup() -> None:
    any_ = anyutil.pack(options_pb2.Options(shim_cgroup="/pyshim/c1", binary_name="runc"))
    opts = start.parse_stdin(any_.SerializeToString(), container_id="c1", namespace="ns")
    assert opts.shim_cgroup == "/pyshim/c1"


def test_stdin_legacy_create_options_shim_cgroup() -> None:
    # containerd's Go client (WithShimCgroup) for a runtime not named io.containerd.runc.*
    legacy = runc_pb2.CreateOptions(shim_cgroup="/pyshim/c1", no_pivot_root=True, io_uid=5)
    raw = anyutil.pack(legacy).SerializeToString()
    assert start.parse_stdin(raw, container_id="c1", namespace="ns").shim_cgroup == "/pyshim/c1"


def test_stdin_other_options_ignored() -> None:
    raw = wire.any_message("containerd.linux.runc.CreateOptions", wire.field_str(3, "/etc/x"))
    assert start.parse_stdin(raw, container_id="c1", namespace="ns").shim_cgroup == ""


def test_stdin_runtime_options_toml_shim_cgroup(tmp_path: Path) -> None:
    # CRI 1.7+ sends the runtime's options section inline; ctr a file's name.
    body = b'SystemdCgroup = true\nShimCgroup = "/pyshim/c1"\n'
    raw = wire.any_message("runtimeoptions.v1.Options", wire.field_bytes(3, body))
    assert start.parse_stdin(raw, container_id="c1", namespace="ns").shim_cgroup == "/pyshim/c1"
    config = tmp_path / "runtime.toml"
    config.write_text('shim_cgroup = "/pyshim/c2"\n')
    raw = wire.any_message("runtimeoptions.v1.Options", wire.field_str(2, str(config)))
    assert start.parse_stdin(raw, container_id="c1", namespace="ns").shim_cgroup == "/pyshim/c2"
    for bad in (b"ShimCgroup = ", b"ShimCgroup = 3\n"):
        raw = wire.any_message("runtimeoptions.v1.Options", wire.field_bytes(3, bad))
        with pytest.raises(start.StartError, match="failed to decode runtime options"):
            start.parse_stdin(raw, container_id="c1", namespace="ns")


def test_stdin_bootstrap_params() -> None:
    opts_any = anyutil.pack(options_pb2.Options(shim_cgroup="/g")).SerializeToString()
    params = (
        wire.field_str(1, "c1")
        + wire.field_str(2, "ns")
        + wire.field_varint(3, -4)  # LogLevel DEBUG: a ten-byte negative varint
        + wire.field_bytes(8, wire.field_bytes(1, opts_any))
        + wire.field_str(9, "/run/other/s")
    )
    opts = start.parse_stdin(params, container_id="c1", namespace="ns")
    assert (opts.shim_cgroup, opts.socket_dir) == ("/g", "/run/other/s")


def test_stdin_bootstrap_for_another_id_is_read_as_any() -> None:
    params = wire.field_str(1, "other") + wire.field_str(2, "ns")
    opts = start.parse_stdin(params, container_id="c1", namespace="ns")
    assert opts.socket_dir is None


def test_stdin_garbage_fails() -> None:
    with pytest.raises(start.StartError):
        start.parse_stdin(b"\xff\xff\xff", container_id="c1", namespace="ns")


# -- daemon argv, oom score -------------------------------------------------------------


def test_daemon_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    opts = parse_flags(
        [
            "-namespace",
            "ns",
            "-address",
            "/a.sock",
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            "c1",
            "-debug",
            "start",
        ]
    )
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/containerd-shim-pyshim-v1"])
    monkeypatch.setattr(os, "access", lambda p, m: True)
    assert start.daemon_argv(opts) == [
        "/usr/local/bin/containerd-shim-pyshim-v1",
        "-namespace", "ns", "-id", "c1", "-address", "/a.sock",
        "-publish-binary", "/usr/bin/containerd", "-debug",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["/src/shim/__main__.py"])
    assert start.daemon_argv(opts)[:3] == [sys.executable, "-m", "shim"]


def _oom(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


@pytest.mark.parametrize(("child_start", "expected_delta"), [(0, 1), (5, 5)])
def test_oom_score_only_ever_raised(
    monkeypatch: pytest.MonkeyPatch, child_start: int, expected_delta: int
) -> None:
    me = _oom(os.getpid())
    if me >= 990:
        pytest.fail(f"test process oom_score_adj {me} leaves no room to check")
    pid = os.posix_spawn("/bin/sleep", ["sleep", "30"], os.environ)
    try:
        Path(f"/proc/{pid}/oom_score_adj").write_text(str(me + child_start))
        monkeypatch.setattr(os, "getppid", os.getpid)
        start.raise_oom_score(pid)
        assert _oom(pid) == me + expected_delta
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# -- run_start end to end (daemon replaced by a probe) -----------------------------------

PROBE = r"""
import json, os, socket, stat, sys, time
s = socket.socket(fileno=3)
info = {
    "pid": os.getpid(), "pgid": os.getpgrp(), "sid": os.getsid(0), "cwd": os.getcwd(),
    "fd3_listening": s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
    "stdio": [os.readlink(f"/proc/self/fd/{i}") for i in range(3)],
    "argv": sys.argv[1:],
}
with open(os.environ["PROBE_OUT"] + ".tmp", "w") as f:
    json.dump(info, f)
os.rename(os.environ["PROBE_OUT"] + ".tmp", os.environ["PROBE_OUT"])
time.sleep(60)
"""


@pytest.fixture
def start_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text("{}")
    monkeypatch.chdir(bundle)
    # The real /run/containerd/s is shared; a temp path must stay under 106 bytes.
    sdir = tempfile.mkdtemp(prefix="pyshim-s-", dir="/tmp")
    monkeypatch.setattr(start, "SOCKET_DIR", sdir)
    monkeypatch.setattr(start, "_read_stdin", lambda: b"")
    monkeypatch.setenv("PROBE_OUT", str(tmp_path / "probe.json"))
    monkeypatch.delenv("SCHED_CORE", raising=False)
    # The re-exec path; the template path has its own tests (test_template.py).
    monkeypatch.setenv("PYSHIM_TEMPLATE", "0")
    monkeypatch.setattr(start, "daemon_argv", lambda opts: [sys.executable, "-c", PROBE, opts.id])
    spawned: list[int] = []
    real_spawn = start.spawn_daemon

    def spawn(argv: list[str], listener: socket.socket) -> int:
        pid = real_spawn(argv, listener)
        spawned.append(pid)
        return pid

    monkeypatch.setattr(start, "spawn_daemon", spawn)
    yield bundle
    for pid in spawned:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    shutil.rmtree(sdir, ignore_errors=True)


def _wait_probe(path: Path) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail("daemon probe never reported")
        time.sleep(0.01)
    info: dict[str, object] = json.loads(path.read_text())
    return info


def test_run_start_spawns_daemon(
    start_env: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    opts = parse_flags(["-namespace", "ns", "-address", "/a.sock", "-id", "c1", "start"])
    assert start.run_start(opts) == 0
    out, err = capfd.readouterr()
    expected = start.socket_address("/a.sock", "ns", "c1", start.SOCKET_DIR)
    assert (out, err) == (expected, "")
    assert (start_env / "address").read_text() == expected
    info = _wait_probe(tmp_path / "probe.json")
    assert info["pgid"] == info["pid"]
    assert info["sid"] == os.getsid(0)
    assert info["cwd"] == str(start_env)
    assert info["fd3_listening"] == 1
    assert info["stdio"] == ["/dev/null"] * 3
    path = expected.removeprefix("unix://")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_second_start_of_group_reuses_daemon(
    start_env: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    (start_env / "config.json").write_text(
        json.dumps({"annotations": {"io.containerd.pyshim.v1.group": "g"}})
    )
    first = parse_flags(["-namespace", "ns", "-address", "/a.sock", "-id", "c1", "start"])
    assert start.run_start(first) == 0
    addr1 = capfd.readouterr().out
    _wait_probe(tmp_path / "probe.json")
    (start_env / "address").unlink()
    second = parse_flags(["-namespace", "ns", "-address", "/a.sock", "-id", "c2", "start"])
    assert start.run_start(second) == 0
    addr2, err = capfd.readouterr()
    assert addr1 == addr2 == start.socket_address("/a.sock", "ns", "g", start.SOCKET_DIR)
    assert err == ""
    assert (start_env / "address").read_text() == addr1


def test_second_start_spawns_nothing(start_env: Path, capfd: pytest.CaptureFixture[str]) -> None:
    calls: list[int] = []
    opts = parse_flags(["-namespace", "ns", "-address", "/a.sock", "-id", "c1", "start"])
    assert start.run_start(opts) == 0
    real = start.spawn_daemon

    def counting(argv: list[str], listener: socket.socket) -> int:
        calls.append(1)
        return real(argv, listener)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(start, "spawn_daemon", counting)
        assert start.run_start(opts) == 0
    assert calls == []
    capfd.readouterr()


def test_failure_after_spawn_kills_daemon_and_unlinks_socket(
    start_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids: list[int] = []
    real = start.spawn_daemon

    def spawn(argv: list[str], listener: socket.socket) -> int:
        pids.append(real(argv, listener))
        return pids[-1]

    def boom(pid: int) -> None:
        raise OSError("oom_score_adj exploded")

    monkeypatch.setattr(start, "spawn_daemon", spawn)
    monkeypatch.setattr(start, "raise_oom_score", boom)
    opts = parse_flags(["-namespace", "ns", "-address", "/a.sock", "-id", "c1", "start"])
    with pytest.raises(OSError, match="exploded"):
        start.run_start(opts)
    path = start.socket_address("/a.sock", "ns", "c1", start.SOCKET_DIR)[len("unix://") :]
    assert not os.path.exists(path)
    assert len(pids) == 1
    # _kill reaped it: the pid is no longer our child.
    with pytest.raises(ChildProcessError):
        os.waitpid(pids[0], os.WNOHANG)


def test_start_imports_stay_lean() -> None:
    """Each of these costs `start` (once per container) 1-5 ms of import time."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(start.__file__)))
    code = (
        "import sys\n"
        f"sys.path.insert(0, {root!r})\n"
        "import shim.boot.cli, shim.boot.start, shim.boot.template, shim.boot.templateclient\n"
        "shim.boot.templateclient.code_key()\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    loaded = printed_by_isolated(code)
    heavy = {"socket", "signal", "enum", "contextlib", "collections", "json", "re", "typing"}
    assert loaded & heavy == set()
