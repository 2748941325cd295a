"""containerd 2.3's start hand-shake: BootstrapParams in, BootstrapResult out
(docs/containerd-2.md); any other stdin gets the bare address."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from protocol.proto import anyutil
from protocol.proto.runc import options_pb2
from protocol.proto.runtime.bootstrap.v1 import bootstrap_pb2
from protocol.proto.runtimeoptions.v1 import api_pb2
from shim.boot import bootstrap, start
from shim.boot.flags import parse_flags
from tests.unit.shim.boot.test_start import start_env

__all__ = ["start_env"]  # the fixture, imported for these tests

ARGV = ["-namespace", "ns", "-address", "/a.sock", "-id", "c1", "start"]


def _params(**fields: object) -> bytes:
    """BootstrapParams as containerd 2.3 builds them (pkg/shim/util.go Command)."""
    msg = bootstrap_pb2.BootstrapParams(
        instance_id="c1",
        namespace="ns",
        log_level=bootstrap_pb2.LOG_LEVEL_DEBUG,
        containerd_version="v2.3.4",
        containerd_ttrpc_address="/a.sock.ttrpc",
        containerd_grpc_address="/a.sock",
        containerd_binary="/usr/local/bin/containerd",
    )
    for name, value in fields.items():
        setattr(msg, name, value)
    return msg.SerializeToString()


def test_result_is_a_bootstrap_result() -> None:
    parsed = bootstrap_pb2.BootstrapResult.FromString(bootstrap.result("unix:///run/x/s/ab"))
    assert (parsed.version, parsed.address, parsed.protocol) == (3, "unix:///run/x/s/ab", "ttrpc")
    assert list(parsed.capabilities) == [] and dict(parsed.metadata) == {}


def test_answer_follows_what_containerd_sent() -> None:
    assert bootstrap.answer("unix:///s/1", bootstrap=False) == b"unix:///s/1"
    assert bootstrap.answer("unix:///s/1", bootstrap=True) == bootstrap.result("unix:///s/1")


def test_generated_params_are_recognised() -> None:
    opts = anyutil.pack(options_pb2.Options(shim_cgroup="/g"))
    msg = bootstrap_pb2.BootstrapParams.FromString(_params(socket_dir="/run/other/s"))
    msg.extensions.add().value.CopyFrom(opts)
    got = start.parse_stdin(msg.SerializeToString(), container_id="c1", namespace="ns")
    assert (got.bootstrap, got.shim_cgroup, got.socket_dir) == (True, "/g", "/run/other/s")


def test_params_without_options_or_socket_dir() -> None:
    got = start.parse_stdin(_params(), container_id="c1", namespace="ns")
    assert (got.bootstrap, got.shim_cgroup, got.socket_dir) == (True, "", None)


@pytest.mark.parametrize(
    "stdin",
    [
        b"",  # 1.6 - 2.2 with no runtime options
        anyutil.pack(options_pb2.Options(shim_cgroup="/g")).SerializeToString(),
        anyutil.pack(api_pb2.Options(config_body=b"SystemdCgroup = true")).SerializeToString(),
    ],
)
def test_legacy_stdin_is_not_bootstrap(stdin: bytes) -> None:
    assert not start.parse_stdin(stdin, container_id="c1", namespace="ns").bootstrap


def test_params_of_another_instance_are_not_bootstrap() -> None:
    """A legacy Any whose type URL happens to equal the id must not pass for params."""
    got = start.parse_stdin(_params(instance_id="c2"), container_id="c1", namespace="ns")
    assert not got.bootstrap


def test_run_start_answers_bootstrap_params_with_a_result(
    start_env: Path, monkeypatch: pytest.MonkeyPatch, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    monkeypatch.setattr(start, "_read_stdin", lambda: _params())
    assert start.run_start(parse_flags(ARGV)) == 0
    out, err = capfdbinary.readouterr()
    expected = start.socket_address("/a.sock", "ns", "c1", start.SOCKET_DIR)
    assert err == b""
    parsed = bootstrap_pb2.BootstrapResult.FromString(out)
    assert (parsed.version, parsed.address, parsed.protocol) == (3, expected, "ttrpc")
    # containerd 1.6/1.7 read the address file; it stays the bare address.
    assert (start_env / "address").read_text() == expected


def test_run_start_of_a_grouped_container_answers_the_same_way(
    start_env: Path, monkeypatch: pytest.MonkeyPatch, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    monkeypatch.setattr(start, "_read_stdin", lambda: _params())
    opts = parse_flags(ARGV)
    assert start.run_start(opts) == 0
    first = capfdbinary.readouterr().out
    # A live daemon of the group answers: no new daemon, the same result.
    assert start.run_start(opts) == 0
    assert capfdbinary.readouterr().out == first


def test_run_start_without_params_prints_the_address(
    start_env: Path, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    assert start.run_start(parse_flags(ARGV)) == 0
    out, err = capfdbinary.readouterr()
    expected = start.socket_address("/a.sock", "ns", "c1", start.SOCKET_DIR)
    assert (out, err) == (expected.encode(), b"")


def test_socket_dir_from_params_holds_the_socket(
    start_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capfdbinary: pytest.CaptureFixture[bytes],
) -> None:
    sdir = start.SOCKET_DIR + "-own"
    monkeypatch.setattr(start, "_read_stdin", lambda: _params(socket_dir=sdir))
    try:
        assert start.run_start(parse_flags(ARGV)) == 0
        parsed = bootstrap_pb2.BootstrapResult.FromString(capfdbinary.readouterr().out)
        assert parsed.address == start.socket_address("/a.sock", "ns", "c1", sdir)
        path = parsed.address.removeprefix("unix://")
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
    finally:
        import shutil

        shutil.rmtree(sdir, ignore_errors=True)


def test_message_names_are_containerds() -> None:
    """api/runtime/bootstrap/v1/bootstrap.proto's package (shared/spec/types.md)."""
    package = "containerd.runtime.bootstrap.v1"
    assert bootstrap_pb2.BootstrapParams.DESCRIPTOR.full_name == f"{package}.BootstrapParams"
    assert bootstrap_pb2.BootstrapResult.DESCRIPTOR.full_name == f"{package}.BootstrapResult"
