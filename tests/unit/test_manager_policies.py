"""Pure pieces of issue 22's manager work: restart rules, references, --since, tmpfs."""

from __future__ import annotations

import argparse
import datetime
import time

import pytest

from manager import cli
from manager.images import ImageError
from manager.records import ContainerRecord
from manager.registry import Reference
from manager.supervisor import wants_restart


def _rec(policy: str, status: int | None, *, count: int = 0, max_: int = 0) -> ContainerRecord:
    return ContainerRecord(
        id="x", name="x", bundle="/b", created_at_ns=0, command=["true"],
        restart_policy=policy, exit_status=status, restart_count=count, restart_max=max_,
    )  # fmt: skip


def test_restart_rules() -> None:
    assert not wants_restart(_rec("no", 1))
    assert wants_restart(_rec("always", 0)) and wants_restart(_rec("unless-stopped", 0))
    assert wants_restart(_rec("on-failure", 1)) and not wants_restart(_rec("on-failure", 0))
    assert wants_restart(_rec("on-failure", 1, count=1, max_=2))
    assert not wants_restart(_rec("on-failure", 1, count=2, max_=2))
    assert not wants_restart(_rec("always", None))  # still running
    stopped = _rec("always", 0)
    stopped.manually_stopped = True
    assert not wants_restart(stopped)


def test_references() -> None:
    r = Reference.parse("busybox")
    assert (r.host, r.repository, r.reference) == (
        "registry-1.docker.io",
        "library/busybox",
        "latest",
    )
    assert r.name == "docker.io/library/busybox:latest"
    r = Reference.parse("127.0.0.1:5000/tools/bb:1")
    assert (r.host, r.repository, r.reference) == ("127.0.0.1:5000", "tools/bb", "1")
    digest = "sha256:" + "a" * 64
    r = Reference.parse(f"localhost/app@{digest}")
    assert (r.host, r.repository, r.reference) == ("localhost", "app", digest)
    for bad in ("UPPER/x", "a b", "x@sha256:12", ""):
        with pytest.raises(ImageError):  # RegistryError is one
            Reference.parse(bad)


def test_since() -> None:
    now = time.time_ns()
    assert abs(cli.parse_since("10m") - (now - 600 * 10**9)) < 5 * 10**9
    assert abs(cli.parse_since("1h30m") - (now - 5400 * 10**9)) < 5 * 10**9
    assert cli.parse_since("1700000000.5") == 1_700_000_000_500_000_000
    when = datetime.datetime(2026, 12, 6, 20, tzinfo=datetime.UTC)
    assert cli.parse_since("2026-12-06T20:00:00Z") == int(when.timestamp()) * 10**9
    for bad in ("yesterday", "10x", "m10"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_since(bad)


def test_volume_and_tmpfs_flags() -> None:
    m = cli.parse_volume("/srv:/data:ro")
    assert (m.type, m.source, m.destination, m.readonly) == ("bind", "/srv", "/data", True)
    m = cli.parse_volume("cache:/c")
    assert (m.type, m.source, m.readonly) == ("volume", "cache", False)
    m = cli.parse_tmpfs("/t:size=64m,mode=700")
    assert (m.type, m.destination, m.options) == ("tmpfs", "/t", "size=64m,mode=700")
    for bad in ("/a", "/a:b", "/a:/b:rx", ":/b"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_volume(bad)
