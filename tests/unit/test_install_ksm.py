"""scripts/ksm.sh: installing pyshim changes nothing node-wide unless asked to."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ksm.sh"


class Node:
    def __init__(self, root: Path, systemd: bool) -> None:
        self.run = root / "sys" / "run"
        self.run.parent.mkdir()
        self.run.write_text("0\n")
        self.tmpfiles = root / "tmpfiles.d"
        self.tmpfiles.mkdir()
        self.systemd_run = root / "run-systemd"
        if systemd:
            self.systemd_run.mkdir()
        self.dropins = root / "containerd.service.d"
        self.reloads = root / "reloads"
        self.systemctl = root / "systemctl"
        self.systemctl.write_text(f'#!/bin/sh\necho "$@" >> {self.reloads}\n')
        self.systemctl.chmod(0o755)

    def install(self, ksm: str | None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "PYSHIM_KSM"}
        env.update(
            KSM_RUN=str(self.run),
            TMPFILES_DIR=str(self.tmpfiles),
            SYSTEMD_RUN_DIR=str(self.systemd_run),
            CONTAINERD_DROPIN_DIR=str(self.dropins),
            SYSTEMCTL=str(self.systemctl),
        )
        if ksm is not None:
            env["PYSHIM_KSM"] = ksm
        return subprocess.run(
            ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, check=True
        )


@pytest.mark.parametrize("ksm", [None, "0", "yes"])
def test_by_default_nothing_changes(tmp_path: Path, ksm: str | None) -> None:
    node = Node(tmp_path, systemd=True)
    node.install(ksm)
    assert node.run.read_text() == "0\n"
    assert list(node.tmpfiles.iterdir()) == []
    assert not node.dropins.exists()
    assert not node.reloads.exists()


def test_asked_for_it_turns_ksmd_on_and_tells_containerds_shims(tmp_path: Path) -> None:
    node = Node(tmp_path, systemd=True)
    node.install("1")
    assert node.run.read_text() == "1\n"
    assert (node.tmpfiles / "pyshim-ksm.conf").read_text() == (
        "w /sys/kernel/mm/ksm/run - - - - 1\n"
    )
    assert (node.dropins / "pyshim-ksm.conf").read_text() == (
        "[Service]\nEnvironment=PYSHIM_KSM=1\n"
    )
    assert node.reloads.read_text() == "daemon-reload\n"


def test_without_systemd_only_ksmd_is_turned_on(tmp_path: Path) -> None:
    node = Node(tmp_path, systemd=False)
    node.install("1")
    assert node.run.read_text() == "1\n"
    assert not node.dropins.exists()


def test_an_earlier_default_install_is_undone_but_ksmd_left_running(tmp_path: Path) -> None:
    node = Node(tmp_path, systemd=True)
    node.install("1")
    res = node.install(None)
    assert node.run.read_text() == "1\n"  # as found: other users may rely on it
    assert list(node.tmpfiles.iterdir()) == []
    assert list(node.dropins.iterdir()) == []
    assert "opt-in" in res.stderr
