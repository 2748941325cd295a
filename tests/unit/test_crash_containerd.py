"""crashtest's own containerd (the harness's containerd driver), without starting it."""

from __future__ import annotations

from pathlib import Path

from crashtest.drivers import _CrashContainerd


def test_the_harness_containerd_gives_pyshim_a_template_dir_of_its_own(tmp_path: Path) -> None:
    # close() SIGKILLs the template (it carries the harness's marker); in the shared
    # default directory (/run/pyshim/template) that left its socket, link and lock.
    (tmp_path / "ctrd").mkdir()
    ctrd = _CrashContainerd(tmp_path / "slowbin", tmp=tmp_path / "ctrd", start=False)
    env = ctrd.env()
    assert env["PYSHIM_TEMPLATE_DIR"] == str(tmp_path / "ctrd" / "template")
    assert env["PATH"].startswith(f"{tmp_path / 'slowbin'}:")
