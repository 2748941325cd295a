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


def test_entry_launcher_runs_a_console_script_without_site(tmp_path: Path) -> None:
    text = launcher.render(entry="manager.cli:main")
    assert text.splitlines()[0].endswith(" -IS")
    assert "from manager.cli import main\n\nsys.exit(main())" in text
    binary = tmp_path / "pyshim"
    assert launcher.main(["--entry", "manager.cli:main", str(binary)]) == 0
    res = subprocess.run([binary, "--help"], capture_output=True, text=True, check=True)
    assert res.stdout.startswith("usage: pyshim ")
    # site never ran: the editable install's finder is not there.
    probe = text.replace("sys.exit(main())", "print('site' in sys.modules)")
    launcher.install(str(binary), probe)
    assert subprocess.run([binary], capture_output=True, text=True).stdout == "False\n"
    assert launcher.main(["--entry", "manager.cli", str(binary)]) == 2


def test_is_launcher_tells_the_launcher_from_pips_wrapper(tmp_path: Path) -> None:
    shim, cli = tmp_path / "containerd-shim-pyshim-v1", tmp_path / "pyshim"
    launcher.install(str(shim), launcher.render())
    launcher.install(str(cli), launcher.render(entry="manager.cli:main"))
    assert launcher.is_launcher(str(shim)) and launcher.is_launcher(str(cli))
    # What pip writes for a console script (and puts back on every `pip install`).
    pip = tmp_path / "pip-wrapper"
    pip.write_text(
        "#!/venv/bin/python3\nimport sys\nfrom shim.boot.cli import main\n"
        "if __name__ == '__main__':\n    sys.exit(main())\n"
    )
    assert not launcher.is_launcher(str(pip))
    assert not launcher.is_launcher(str(tmp_path / "missing"))
    binary = tmp_path / "binary"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\xff\xfe" + bytes(300))
    assert not launcher.is_launcher(str(binary))
