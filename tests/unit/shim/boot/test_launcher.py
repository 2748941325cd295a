"""shim/boot/launcher.py: the binary containerd runs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from shim.boot import launcher


def test_launcher_hands_start_over_then_runs_the_cli(tmp_path: Path) -> None:
    text = launcher.render()
    assert text.splitlines()[0].endswith(" -IS")
    assert "from shim.boot.quickstart import run as quick_start" in text
    binary = tmp_path / "containerd-shim-pyshim-v1"
    launcher.install(str(binary), text)
    # Anything but `start` goes straight to shim.boot.cli.
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("containerd-shim-pyshim-v1:\n  Version:")
    res = subprocess.run([binary, "-namespace", "ns", "bogus"], capture_output=True, text=True)
    assert (res.returncode, res.stderr) == (1, "io.containerd.pyshim.v1: unknown action 'bogus'")
