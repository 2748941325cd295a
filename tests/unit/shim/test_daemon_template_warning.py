"""A template directory the shim will not use is said so in the shim's log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from shim.boot import rendezvous
from shim.daemon import warn_unusable_template


@pytest.fixture
def tdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "template"
    monkeypatch.setenv(rendezvous.DIR_ENV, str(path))
    monkeypatch.delenv(rendezvous.ENABLE_ENV, raising=False)
    return path


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_directory_others_can_read_is_reported(
    tdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tdir.mkdir(mode=0o755)
    tdir.chmod(0o755)
    warn_unusable_template()
    (message,) = _warnings(caplog)
    assert f"shim template directory {tdir} is not used" in message
    assert "mode 755" in message


@pytest.mark.parametrize("mode", [None, 0o700])
def test_a_private_or_missing_directory_is_not_reported(
    tdir: Path, caplog: pytest.LogCaptureFixture, mode: int | None
) -> None:
    if mode is not None:
        tdir.mkdir(mode=mode)
    warn_unusable_template()
    assert _warnings(caplog) == []


def test_nothing_is_said_with_the_template_turned_off(
    tdir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    tdir.mkdir(mode=0o777)
    monkeypatch.setenv(rendezvous.ENABLE_ENV, "0")
    warn_unusable_template()
    assert _warnings(caplog) == []
