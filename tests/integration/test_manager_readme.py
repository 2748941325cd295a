"""The README's pyshimd/pyshim example, run line by line as written against a real
pyshimd (the test's own: its run/state dirs, bridge and subnet come from the
environment and flags, which is what the README's first line leaves to the reader).

Two things are adapted, and only these: `pyshimd &` is the test's already running
daemon, and host port 8080 becomes a free port (8080 may be taken on a shared host).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crashtest.images import build_busybox_oci_archive
from tests.support.manager import BIN, Manager, manager_session
from tests.support.net import free_port

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Without containerd: pyshimd and pyshim"


def readme_commands() -> list[str]:
    text = README.read_text()
    block = re.search(r"```sh\n(.*?)```", text[text.index(SECTION) :], re.S)
    assert block is not None
    return [ln for ln in block.group(1).splitlines() if ln.strip()]


@pytest.fixture
def manager() -> Iterator[Manager]:
    with manager_session() as m:
        yield m


def test_readme_example_runs_as_written(manager: Manager) -> None:
    lines = readme_commands()
    assert lines[0].startswith("pyshimd &")
    work = manager.root / "readme"
    work.mkdir()
    # A busybox image whose httpd and wget are on PATH, as in docker's busybox.
    build_busybox_oci_archive(
        work / "busybox.tar", "docker.io/library/busybox:latest", ("httpd", "wget")
    )
    port = str(free_port())
    env = dict(manager.env, PATH=f"{BIN}:{os.environ['PATH']}")
    outputs: list[str] = []
    for line in lines[1:]:
        command = line.replace("8080", port)
        deadline = time.monotonic() + 30
        while True:
            res = subprocess.run(
                ["sh", "-c", command],
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
            )
            # curl may come before httpd listens (a person typing is slower).
            if res.returncode == 0 or not line.startswith("curl") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert res.returncode == 0, (line, res.stdout, res.stderr, manager.daemon_log()[-3000:])
        outputs.append(res.stdout)
    by_line = dict(zip(lines[1:], outputs, strict=True))
    assert lines[1].startswith("pyshim run -- echo hello") and outputs[0] == "hello\n"
    curl = next(out for ln, out in by_line.items() if ln.startswith("curl"))
    assert curl == "hello\n"
    wget = next(out for ln, out in by_line.items() if ln.startswith("pyshim exec web"))
    assert wget == "hello\n"
    cat = next(out for ln, out in by_line.items() if "cat /data/f" in ln)
    assert cat == "kept\n"
    ps = next(out for ln, out in by_line.items() if ln.startswith("pyshim ps;"))
    assert " web " in ps and "running" in ps
    # What is left: the first `run` (no --rm), exited.
    left = json.loads(manager.ok("ps", "--all", "--json"))
    assert [(c["command"], c["exited"]) for c in left] == [(["echo", "hello"], True)]
