"""`-info`: the features reported are those of the runtime binary Create would run."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest

from protocol import wire
from protocol.proto import anyutil
from protocol.proto.runc import options_pb2
from shim.boot import cli, info


def _any(msg: options_pb2.Options) -> bytes:
    return anyutil.pack(msg).SerializeToString()


@pytest.mark.parametrize(
    ("options", "binary"),
    [
        (b"", "runc"),
        (_any(options_pb2.Options()), "runc"),
        (_any(options_pb2.Options(binary_name="crun", root="/r")), "crun"),
        (wire.any_message("runtimeoptions.v1.Options", wire.field_str(2, "/c.toml")), "runc"),
        (b"\xff\xff", "runc"),
    ],
    ids=["none", "runc-default", "binary-name", "cri-options", "garbage"],
)
def test_features_binary(options: bytes, binary: str) -> None:
    assert info.features_binary(options) == binary


def test_info_asks_the_binary_name_for_its_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfdbinary: pytest.CaptureFixture[bytes]
) -> None:
    fake = tmp_path / "fake-oci"
    fake.write_text('#!/bin/sh\n[ "$1" = features ] && printf \'{"ociVersionMax":"9.9.9"}\'\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    options = _any(options_pb2.Options(binary_name="fake-oci"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(options)))
    assert cli.main(["shim", "-info"]) == 0
    fields = {n: v for n, _, v in wire.iter_fields(capfdbinary.readouterr().out)}
    assert fields[3] == options
    type_url, features = wire.decode_any(fields[4])  # type: ignore[arg-type]
    assert (type_url, features) == (cli.FEATURES_TYPE_URL, b'{"ociVersionMax":"9.9.9"}')
