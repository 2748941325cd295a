"""The `delete` action's fast paths: what it may skip, and what it must not."""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from protocol.proto.task.v2 import shim_pb2
from shim.boot import cli, delete, minijson
from shim.records.recordlog import RECORD, encode, log_path
from shim.records.state import ExitLog, ExitRecord, RecordError
from shim.records.statedir import EXIT_LOG


def _fake_runc(tmp_path: Path) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / "runc"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/runc-argv\nexit 0\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def _bundle(tmp_path: Path, cid: str, root: Path, fake: Path) -> Path:
    bundle = tmp_path / cid
    bundle.mkdir()
    (bundle / "options.json").write_text(json.dumps({"binary_name": str(fake), "root": str(root)}))
    return bundle


def test_runc_delete_skipped_when_runc_has_no_state(
    tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    fake = _fake_runc(tmp_path)
    root = tmp_path / "root"
    (root / "ns").mkdir(parents=True)
    bundle = _bundle(tmp_path, "c1", root, fake)
    argv = ["shim", "-namespace", "ns", "-id", "c1", "-bundle", str(bundle), "delete"]
    assert cli.main(argv) == 0
    resp = shim_pb2.DeleteResponse.FromString(capfdbinary.readouterr().out)
    assert resp.exit_status == 137
    assert not (tmp_path / "runc-argv").exists()


@pytest.mark.parametrize("leftover", ["dir", "empty-dir-no-state-json", "file"])
def test_runc_delete_runs_when_runc_state_is_there(
    tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes], leftover: str
) -> None:
    # A shim that died mid-create leaves runc's directory without state.json; only
    # `runc delete --force` knows how to clean that up.
    fake = _fake_runc(tmp_path)
    root = tmp_path / "root"
    (root / "ns").mkdir(parents=True)
    if leftover == "file":
        (root / "ns" / "c1").write_text("")
    else:
        (root / "ns" / "c1").mkdir()
        if leftover == "dir":
            (root / "ns" / "c1" / "state.json").write_text("{}")
    bundle = _bundle(tmp_path, "c1", root, fake)
    argv = ["shim", "-namespace", "ns", "-id", "c1", "-bundle", str(bundle), "delete"]
    assert cli.main(argv) == 0
    capfdbinary.readouterr()
    assert (tmp_path / "runc-argv").read_text().split("\n")[-3:-1] == ["--force", "c1"]


def test_exit_record_reader_agrees_with_state(tmp_path: Path) -> None:
    when = 1_750_000_000_123_456_789
    exits = ExitLog(str(tmp_path))
    exits.record(ExitRecord(container_id="c1", exec_id="e1", pid=78, exit_status=1, exited_at_ns=1))
    exits.record(
        ExitRecord(container_id="c1", exec_id="", pid=77, exit_status=143, exited_at_ns=when)
    )
    exits.record(ExitRecord(container_id="c2", exec_id="", pid=79, exit_status=2, exited_at_ns=2))
    exits.close()
    loaded, records = ExitLog.load(str(tmp_path), "c1")
    loaded.close()
    expected = records["c1"]
    assert delete.read_init_exit(str(tmp_path), "c1") == (
        expected.pid,
        expected.exit_status,
        expected.exited_at_ns,
    )
    assert delete.read_init_exit(str(tmp_path / "missing"), "c1") is None


def _plant(bundle: Path, payload: bytes) -> None:
    path = Path(log_path(str(bundle), EXIT_LOG))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(encode(RECORD, 0, payload))


def _legacy(bundle: Path) -> Path:
    path = bundle / "pyshim" / "exits" / "c1.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _state_reads(bundle: Path) -> ExitRecord | None:
    exits, records = ExitLog.load(str(bundle), "c1")
    exits.close()
    return records.get("c1")


@pytest.mark.parametrize(
    ("content", "owned"),
    [
        # Whose record it is cannot be told: in the log nobody's, in a c1.json the init's.
        (b"", False),
        (b"{", False),
        (b"[]", False),
        (b'{"version":1,"exec_id":"","pid":1,"exit_status":0,"exited_at_ns":1}', False),
        (
            b'{"version":2,"container_id":"c1","exec_id":"","pid":1,"exit_status":0,"exited_at_ns":1}',
            True,
        ),
        (
            b'{"version":1,"container_id":"c1","exec_id":"","pid":"1","exit_status":0,"exited_at_ns":1}',
            True,
        ),
        (
            b'{"version":1,"container_id":"c1","exec_id":"","pid":true,"exit_status":0,"exited_at_ns":1}',
            True,
        ),
    ],
)
@pytest.mark.parametrize("where", ["log", "legacy file"])
def test_exit_record_reader_refuses_what_state_refuses(
    tmp_path: Path, content: bytes, owned: bool, where: str
) -> None:
    if where == "log":
        _plant(tmp_path, content)
    else:
        _legacy(tmp_path).write_bytes(content)
    if owned or where == "legacy file":
        with pytest.raises(RecordError):
            _state_reads(tmp_path)
        with pytest.raises(ValueError):
            delete.read_init_exit(str(tmp_path), "c1")
    else:
        assert _state_reads(tmp_path) is None
        assert delete.read_init_exit(str(tmp_path), "c1") is None


def test_exit_record_reader_names_an_unknown_version(tmp_path: Path) -> None:
    _plant(
        tmp_path,
        b'{"version":99,"container_id":"c1","exec_id":"","pid":1,"exit_status":0,"exited_at_ns":1}',
    )
    with pytest.raises(ValueError, match="has version 99; this shim reads version 1"):
        delete.read_init_exit(str(tmp_path), "c1")


def test_exit_record_reader_reads_a_shim_before_the_log(tmp_path: Path) -> None:
    _legacy(tmp_path).write_bytes(
        b'{"version":1,"container_id":"c1","exec_id":"","pid":5,"exit_status":9,"exited_at_ns":7}'
    )
    assert delete.read_init_exit(str(tmp_path), "c1") == (5, 9, 7)


@pytest.mark.parametrize("where", ["log", "legacy file"])
def test_exit_record_reader_refuses_symlinks_and_fifos(tmp_path: Path, where: str) -> None:
    target = tmp_path / "elsewhere"
    record = (
        b'{"version":1,"container_id":"c1","exec_id":"","pid":1,"exit_status":0,"exited_at_ns":1}'
    )
    target.write_bytes(record if where == "legacy file" else encode(RECORD, 0, record))
    bundle = tmp_path / "b"
    path = Path(log_path(str(bundle), EXIT_LOG)) if where == "log" else _legacy(bundle)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    with pytest.raises(OSError):
        delete.read_init_exit(str(bundle), "c1")
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(ValueError, match="not a regular file"):
        delete.read_init_exit(str(bundle), "c1")


def test_corrupt_exit_record_falls_back_to_unknown_status(
    tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    bundle = tmp_path / "c1"
    _plant(bundle, b'{"version":1,"container_id":"c1","exec_id":"","pid":"x"}')
    argv = ["shim", "-namespace", "ns", "-id", "c1", "-bundle", str(bundle), "delete"]
    assert cli.main(argv) == 0
    captured = capfdbinary.readouterr()
    assert shim_pb2.DeleteResponse.FromString(captured.out).exit_status == 137
    assert b"failed to read exit record" in captured.err


def test_is_mount_point_reads_mountinfo(tmp_path: Path) -> None:
    spaced = tmp_path / "a b\\c"
    spaced.mkdir()
    plain = tmp_path / "plain"
    plain.mkdir()
    escaped = str(spaced).replace("\\", "\\134").replace(" ", "\\040")
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        f"90 22 0:50 / {escaped} rw,relatime - overlay overlay rw,lowerdir=/x\n"
    )
    assert delete.is_mount_point(str(spaced), str(info)) is True
    assert delete.is_mount_point(str(plain), str(info)) is False
    assert delete.is_mount_point(str(plain), str(tmp_path / "nope")) is None
    # Through a symlinked bundle path too: the kernel lists resolved paths.
    link = tmp_path / "link"
    link.symlink_to(spaced)
    assert delete.is_mount_point(str(link), str(info)) is True


def test_is_mount_point_on_this_host(tmp_path: Path) -> None:
    assert delete.is_mount_point("/") is True
    assert delete.is_mount_point(str(tmp_path)) is False


def test_unmount_runs_when_rootfs_is_mounted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shim.task.mount

    (tmp_path / "rootfs").mkdir()
    calls: list[str] = []
    monkeypatch.setattr(shim.task.mount, "unmount_all", calls.append)
    for answer, expected in ((True, 1), (None, 2), (False, 2)):
        monkeypatch.setattr(delete, "is_mount_point", lambda _p, a=answer: a)
        delete._unmount_rootfs(str(tmp_path))
        assert len(calls) == expected


def test_dead_socket_check_without_socket_file(tmp_path: Path) -> None:
    (tmp_path / "address").write_text(f"unix://{tmp_path}/gone.sock")
    delete.remove_dead_socket(str(tmp_path))  # nothing to do, nothing raised


DOCS = [
    '{"a": [1, -2.5e3, true, false, null, "x\\u00e9\\n"], "b": {}, "c": []}',
    '  \n\t{"ociVersion": "1.0.2", "annotations": {"k": "v"}}\r\n ',
    '"just a string"',
    "12345678901234567890",
    '{"nested": [[[{"deep": "é"}]]]}',
    '{"dup": 1, "dup": 2}',
    "[NaN, Infinity, -Infinity]",
]


@pytest.mark.parametrize("doc", DOCS)
def test_minijson_loads_like_json(doc: str) -> None:
    expected = json.loads(doc)
    for data in (doc, doc.encode()):
        got = minijson.loads(data)
        if doc.startswith("[NaN"):
            assert math.isnan(got[0]) and got[1:] == expected[1:]
        else:
            assert got == expected


@pytest.mark.parametrize(
    "doc", ["", "{", '{"a" 1}', "[1,]", "{} x", '"\x01"', b"\xff\xfe{}", b"\xef\xbb\xbf{}"]
)
def test_minijson_errors_like_json(doc: str | bytes) -> None:
    try:
        expected: object = json.loads(doc)
    except ValueError as exc:
        with pytest.raises(ValueError) as info:
            minijson.loads(doc)
        assert type(info.value) is type(exc)
    else:
        assert minijson.loads(doc) == expected


@pytest.mark.parametrize(
    "value",
    [
        {"op": "fork", "argv": ["/bin/x", "-id", "é"], "env": {"A": 'b\n"c"'}, "umask": 18},
        [None, True, False, 1.5, -3, "", {}],
    ],
)
def test_minijson_dumps_round_trips(value: object) -> None:
    assert json.loads(minijson.dumps(value)) == value
    assert minijson.loads(minijson.dumps(value)) == value


def test_minijson_dumps_refuses_what_it_cannot_encode() -> None:
    with pytest.raises(TypeError):
        minijson.dumps({1: "x"})
    with pytest.raises(TypeError):
        minijson.dumps(object())
    with pytest.raises(ValueError):
        minijson.dumps(float("nan"))


def test_a_runc_create_that_outlived_its_shim_is_killed_before_the_state_check(
    tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    # Seen in the crash harness (containerd, seed 20261128, step 46): the shim was
    # SIGKILLed 7 ms into `runc create`; the `runc create` was still running when
    # containerd's `delete` found no runc state dir (and skipped `runc delete`), then
    # made that dir, which stayed. No init.pid: runc create never finished.
    fake = _fake_runc(tmp_path)
    root = tmp_path / "root"
    (root / "ns").mkdir(parents=True)
    bundle = _bundle(tmp_path, "c1", root, fake)
    state_dir = root / "ns" / "c1"
    ready = tmp_path / "ready"
    code = (
        "import os, sys, time\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "time.sleep(1.0)\n"
        f"os.mkdir({str(state_dir)!r})\n"
    )
    straggler = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "--root",
            str(root / "ns"),
            "--log",
            str(bundle / "log.json"),
            "--log-format",
            "json",
            "create",
            "--bundle",
            str(bundle),
            "c1",
        ]
    )
    try:
        deadline = time.monotonic() + 10
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.exists()
        argv = ["shim", "-namespace", "ns", "-id", "c1", "-bundle", str(bundle), "delete"]
        assert cli.main(argv) == 0
        capfdbinary.readouterr()
        # Killed by the delete: it never gets to make the directory.
        assert straggler.wait(timeout=10) == -signal.SIGKILL
    finally:
        if straggler.poll() is None:
            straggler.kill()
            straggler.wait()
    assert not state_dir.exists()


def test_a_runc_create_of_another_root_or_id_is_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "root"
    others = [
        [sys.executable, "-c", "import time; time.sleep(30)", "--root", str(root / "other"),
         "create", "c1"],
        [sys.executable, "-c", "import time; time.sleep(30)", "--root", str(root / "ns"),
         "create", "c10"],
        [sys.executable, "-c", "import time; time.sleep(30)", "--root", str(root / "ns"),
         "delete", "c1"],
    ]  # fmt: skip
    procs = [subprocess.Popen(a) for a in others]
    mine = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(30)",
            "--root",
            str(root / "ns"),
            "create",
            "--bundle",
            "b",
            "c1",
        ]
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and mine.pid not in delete._runc_creates(
            str(root / "ns"), "c1"
        ):
            time.sleep(0.01)
        assert delete._runc_creates(str(root / "ns"), "c1") == [mine.pid]
        delete.kill_runc_creates(str(root / "ns"), "c1")
        assert mine.wait(timeout=10) == -signal.SIGKILL
        assert all(p.poll() is None for p in procs)
    finally:
        for p in [*procs, mine]:
            p.kill()
            p.wait()


@pytest.mark.parametrize("with_state", [False, True])
def test_a_stateless_runc_dir_left_by_runc_delete_is_removed(
    tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes], with_state: bool
) -> None:
    fake = _fake_runc(tmp_path)  # exits 0 and removes nothing
    root = tmp_path / "root"
    state_dir = root / "ns" / "c1"
    state_dir.mkdir(parents=True)
    os.mkfifo(state_dir / "exec.fifo")
    if with_state:
        (state_dir / "state.json").write_text("{}")
    bundle = _bundle(tmp_path, "c1", root, fake)
    (bundle / "init.pid").write_text("4242")
    argv = ["shim", "-namespace", "ns", "-id", "c1", "-bundle", str(bundle), "delete"]
    assert cli.main(argv) == 0
    capfdbinary.readouterr()
    # Only runc may remove a container it knows (state.json); the rest is debris.
    assert state_dir.exists() == with_state


def _dead_socket(path: Path) -> None:
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # bound, never listening: connect is refused


@pytest.mark.parametrize("address_file", [True, False])
def test_ungrouped_socket_of_a_killed_start_is_looked_for_only_without_address(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfdbinary: pytest.CaptureFixture[bytes],
    address_file: bool,
) -> None:
    # A start killed before it wrote `address` leaves the socket it bound, named by
    # our flags; with `address` written, that file names the socket there is.
    from shim.boot import start

    sdir = Path(tempfile.mkdtemp(prefix="pyshim-d-", dir="/tmp"))
    try:
        monkeypatch.setattr(start, "SOCKET_DIR", str(sdir))
        monkeypatch.setattr(
            start,
            "socket_address",
            lambda a, n, k, d=str(sdir): f"unix://{d}/{n}-{k}.sock",
        )
        ungrouped = sdir / "ns-c1.sock"
        _dead_socket(ungrouped)
        root = tmp_path / "root"
        (root / "ns").mkdir(parents=True)
        bundle = _bundle(tmp_path, "c1", root, _fake_runc(tmp_path))
        (bundle / "init.pid").write_text("1")
        if address_file:
            named = sdir / "named.sock"
            _dead_socket(named)
            (bundle / "address").write_text(f"unix://{named}")
        argv = ["shim", "-namespace", "ns", "-id", "c1", "-bundle", str(bundle)]
        assert cli.main([*argv, "-address", "/a.sock", "delete"]) == 0
        capfdbinary.readouterr()
        assert ungrouped.exists() is address_file
        if address_file:
            assert not named.exists()
    finally:
        import shutil

        shutil.rmtree(sdir, ignore_errors=True)
