"""shim/boot/launcher.py: the binary containerd runs."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from shim.boot import launcher
from shim.boot.quickstart import SCHED_CORE_ENV
from shim.boot.rendezvous import ENABLE_ENV

REPO = Path(__file__).resolve().parents[4]


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


def test_pips_console_script_hands_start_to_the_template_first() -> None:
    """An install without scripts/install.sh's launcher (a plain `pip install`) runs
    pyproject's entry point through pip's wrapper: it too offers `start` to the
    template before importing the CLI (pip's wrapper with the CLI's main did not, and
    a start took ~50 ms more)."""
    with open(REPO / "pyproject.toml", "rb") as f:
        entry = tomllib.load(f)["project"]["scripts"]["containerd-shim-pyshim-v1"]
    module, _, func = entry.partition(":")
    # pip's wrapper, with the hand-over stubbed: it reports and "exits" as a template's
    # start would.
    wrapper = (
        "import sys\n"
        "import shim.boot.quickstart as q\n"
        "q.handoff = lambda argv, d, k: print('handed', argv[-1].decode(), flush=True) or 7\n"
        f"from {module} import {func}\n"
        f"sys.exit({func}())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in (ENABLE_ENV, SCHED_CORE_ENV)}
    flags = ["-namespace", "ns", "-id", "c1", "-address", "/nope"]
    res = subprocess.run(
        [sys.executable, "-c", wrapper, *flags, "start"], capture_output=True, text=True, env=env
    )
    assert (res.returncode, res.stdout) == (7, "handed start\n"), res.stderr
    res = subprocess.run([sys.executable, "-c", wrapper, "-v"], capture_output=True, text=True)
    assert res.returncode == 0 and "Version:" in res.stdout, res.stderr
    res = subprocess.run(
        [sys.executable, "-c", wrapper, *flags, "bogus"], capture_output=True, text=True
    )
    assert (res.returncode, res.stderr) == (1, "io.containerd.pyshim.v1: unknown action 'bogus'")
