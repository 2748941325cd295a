"""crashtest: what a run with violations keeps of the daemon's log and records."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import cast

from crashtest.cli import keep_evidence
from crashtest.drivers import Driver
from crashtest.report import text
from crashtest.result import Report, Violation


class FakeDriver:
    def __init__(self, files: list[Path]) -> None:
        self.ids = {"c2": "0a1b2c"}
        self.files = files

    def evidence_files(self) -> list[Path]:
        return self.files


def test_violations_keep_the_log_records_and_lines_naming_their_containers(
    tmp_path: Path,
) -> None:
    log = tmp_path / "pyshimd.log"
    log.write_text(
        "level=info msg=started container 0a1b2c\n"
        "level=info msg=unrelated c3\n"
        "level=warning msg=exit of c2 not recorded\n"
        "level=debug msg=removed digest=sha256:e1c2d9\n"
        "level=info msg=serving /tmp/crash-x/state\n"
        "level=info msg=run 00aa11bb22cc33dd\n"
    )
    records = tmp_path / "state"
    (records / "containers").mkdir(parents=True)
    (records / "containers" / "0a1b2c.json").write_text("{}")
    report = Report(driver="manager", runtime="rt", seed=7)
    report.violations.append(
        Violation("exit-unknown", 4, "c2 init: no exit status", container="c2")
    )
    # A leak names no container of its own: the lines naming the ids in its text.
    report.violations.append(
        Violation("leak", -1, "state left in /tmp/crash-x/state/containers: ['00aa11bb22cc33dd']")
    )
    d = cast(Driver, FakeDriver([log, records, tmp_path / "missing.log"]))
    lines = keep_evidence(d, report)
    kept = Path(lines[0].rsplit(" ", 1)[1])
    try:
        assert kept.name.startswith("pyshim-crash-7-")
        assert (kept / "pyshimd.log").read_text() == log.read_text()
        assert (kept / "state" / "containers" / "0a1b2c.json").exists()
        assert len(lines) == 2  # the kept dir, and missing.log not kept
        quoted = report.violations[0].evidence
        assert quoted == [
            "pyshimd.log: level=info msg=started container 0a1b2c",
            "pyshimd.log: level=warning msg=exit of c2 not recorded",
        ]
        assert report.violations[1].evidence == ["pyshimd.log: level=info msg=run 00aa11bb22cc33dd"]
        assert any("missing.log: not kept" in line for line in lines)
        report.evidence = lines
        rendered = text(report)
        assert "evidence: pyshimd.log: level=warning msg=exit of c2" in rendered
        assert str(kept) in rendered
    finally:
        shutil.rmtree(kept)
