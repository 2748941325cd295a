"""containerd's address rules (shim-cli.md "Socket addresses", events.md)."""

from __future__ import annotations

import pytest

from protocol.ttrpc.address import (
    UnsupportedAddressError,
    dial_path,
    parse_ttrpc_address,
    socket_path_for_events,
    unix_address,
)


def test_unix_scheme_is_a_filesystem_path() -> None:
    assert dial_path("unix:///run/containerd/s/abc") == "/run/containerd/s/abc"


def test_no_scheme_is_abstract() -> None:
    assert dial_path("containerd-shim/x.sock") == "\0containerd-shim/x.sock"


@pytest.mark.parametrize("bad", ["vsock://3:1024", "tcp://1.2.3.4:5"])
def test_other_schemes_refused(bad: str) -> None:
    with pytest.raises(UnsupportedAddressError):
        dial_path(bad)


@pytest.mark.parametrize("bad", ["", "unix://"])
def test_empty_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        dial_path(bad)


def test_unix_address_round_trip() -> None:
    addr = unix_address("/run/containerd/s/1edd")
    assert addr == "unix:///run/containerd/s/1edd"
    assert dial_path(addr) == "/run/containerd/s/1edd"
    with pytest.raises(ValueError):
        unix_address("\0abstract")


def test_ttrpc_address_plain_path_is_not_abstract() -> None:
    assert parse_ttrpc_address("/tmp/c/containerd.sock.ttrpc") == "/tmp/c/containerd.sock.ttrpc"
    assert parse_ttrpc_address("unix:///tmp/c.ttrpc") == "/tmp/c.ttrpc"
    with pytest.raises(UnsupportedAddressError):
        parse_ttrpc_address("vsock://1:2")
    with pytest.raises(ValueError):
        parse_ttrpc_address("unix://")


def test_socket_path_for_events_from_env() -> None:
    assert socket_path_for_events({"TTRPC_ADDRESS": "unix:///a/b"}) == "/a/b"
    assert socket_path_for_events({"TTRPC_ADDRESS": ""}) is None
    assert socket_path_for_events({}) is None


def test_socket_path_for_events_reads_process_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTRPC_ADDRESS", "/run/x.ttrpc")
    assert socket_path_for_events() == "/run/x.ttrpc"
