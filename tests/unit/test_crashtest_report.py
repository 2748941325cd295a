"""crashtest's reports (text, JSON, side by side, HTML with a timeline) from a recorded
result, and the history a violation is given. No root, no containerd."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import cast

import pytest

from crashtest import cli
from crashtest.drivers import Driver
from crashtest.plan import FAULT_KINDS, Fault, Op, Plan, Step, generate
from crashtest.report import compare_text, fault_rows, guarantees, html_page, text
from crashtest.result import Degradation, Report, StepRecord, Violation
from crashtest.runner import Runner

SVG = "{http://www.w3.org/2000/svg}"


def _step(
    i: int, op: str, slot: str, fault: str = "", fired: bool = True, **kw: object
) -> StepRecord:
    return StepRecord(
        i,
        op,
        slot,
        f"#{i:04d} {op} {slot}" + (f"  !! {fault}" if fault else ""),
        start=float(i),
        end=i + 0.5,
        fault=fault,
        fault_text=f"{fault} at=+0.0s" if fault else "",
        fired=fired if fault else False,
        **kw,  # type: ignore[arg-type]
    )


def recorded(runtime: str = "io.containerd.runc.v2", broken: bool = True) -> Report:
    """Five steps: c0 runs, its shim is killed, a daemon kill, a disk-full with nothing
    to fill in a useful moment, c0 deleted; a wrong exit and a lost one after."""
    r = Report("containerd", runtime, seed=9, planned_ops=4, planned_faults=3, host="1.6.20")
    r.fault_kinds = list(FAULT_KINDS)
    r.timeline = [
        _step(0, "run", "c0"),
        _step(1, "exec", "c0", fault="shim-kill"),
        _step(2, "run", "c1", fault="daemon-kill", outcome="error", errors=["ctr: <dial> failed"]),
        _step(3, "status", "c1", fault="disk-full", fired=False),
        _step(4, "delete", "c0"),
    ]
    r.faults = {"shim-kill": 1, "daemon-kill": 1, "disk-full": 1}
    r.steps, r.seconds = 5, 5.0
    r.ops = {"run": 2, "exec": 1, "status": 1, "delete": 1}
    if broken:
        r.violations = [
            Violation(
                "exit-wrong",
                4,
                "c0 init: expected [3], got [<1>]",
                container="c0",
                steps=[0, 1, 2, 4],
                fault_kinds=["daemon-kill", "shim-kill"],
                records=["init: 1 from ctr task delete (step 4)"],
                evidence=["containerd.log: level=error msg=c0 gone"],
            ),
            Violation("leak", -1, "cgroup /sys/fs/cgroup/x/c1 left", container="c1", steps=[2, 3]),
        ]
        r.violations[1].fault_kinds = ["daemon-kill"]
    r.degraded = [
        Degradation("exit-lost-to-137", "c0", "c0 exec c0-e0: reported 137", ["shim-kill"])
    ]
    return r


def test_fault_rows_count_findings_under_every_fault_before_them() -> None:
    rows = {row.kind: row for row in fault_rows(recorded())}
    assert rows["shim-kill"].fired == 1 and rows["shim-kill"].violations == {"exits": 1}
    assert rows["shim-kill"].degraded == {"exit-lost-to-137": 1}
    assert rows["daemon-kill"].violations == {"exits": 1, "resources": 1}
    assert rows["daemon-kill"].failed_ops == 1
    assert rows["disk-full"].planned == 1 and rows["disk-full"].fired == 0
    assert rows["no fault on it"].violations == {}


def test_guarantees_per_fault_kind() -> None:
    g = guarantees(recorded())
    assert g["shim-kill"]["exits right"] == "broken (1)"
    assert g["shim-kill"]["real exit kept"] == "broken (1)"
    assert g["shim-kill"]["nothing left behind"] == "kept"
    assert g["daemon-kill"]["nothing left behind"] == "broken (1)"
    assert g["disk-full"]["exits right"] == "not exercised"
    clean = guarantees(recorded(broken=False))
    assert clean["daemon-kill"]["exits right"] == "kept"


def test_text_shows_each_violation_with_its_steps_records_and_evidence() -> None:
    out = text(recorded())
    block = out[out.index("[exit-wrong]") :]
    lines = block.splitlines()
    assert lines[1].strip() == "steps that led to it:"
    assert [x.strip() for x in lines[2:6]] == [
        "#0000 run c0",
        "#0001 exec c0  !! shim-kill",
        "#0002 run c1  !! daemon-kill  -> error",
        "#0004 delete c0",
    ]
    assert "records: init: 1 from ctr task delete (step 4)" in lines[6]
    assert "evidence: containerd.log: level=error msg=c0 gone" in lines[7]
    table = out[out.index("per fault kind") :].splitlines()[1:4]
    assert table[0].split() == ["fault", "planned", "fired", "failed-ops", "violations",
                                "weaker-guarantees"]  # fmt: skip
    assert table[1].split() == ["daemon-kill", "1", "1", "1", "exits=1,", "resources=1", "-"]
    assert "replay: pyshim-crashtest --driver containerd --runtime io.containerd.runc.v2 " \
        "--seed 9 --ops 4 --faults 3" in out  # fmt: skip
    assert out.splitlines()[-1].startswith("2 VIOLATIONS: driver=containerd")


def test_json_round_trips_and_refuses_other_documents() -> None:
    r = recorded()
    again = Report.loads(r.dumps())
    assert again == r
    assert json.loads(r.dumps())["violations"][0]["steps"] == [0, 1, 2, 4]
    with pytest.raises(ValueError, match="not a crashtest result"):
        Report.loads('{"seed": 1}')
    with pytest.raises(ValueError, match="not JSON"):
        Report.loads("{")


def test_compare_marks_where_the_runtimes_differ() -> None:
    out = compare_text(recorded(), recorded("io.containerd.pyshim.v1", broken=False))
    marked = [line.split() for line in out.splitlines() if line.strip().startswith("*")]
    assert ["*", "shim-kill", "exits", "right", "broken", "(1)", "kept"] in marked
    assert ["*", "daemon-kill", "nothing", "left", "behind", "broken", "(1)", "kept"] in marked
    # Kept by neither or both is no difference; not exercised is never one.
    assert not any(m[1] == "disk-full" for m in marked)
    assert any("real exit kept" in line and "*" not in line for line in out.splitlines())
    assert f"{len(marked)} difference(s)" in out
    assert "WARNING" not in out
    other = recorded("io.containerd.pyshim.v1")
    other.seed = 10
    assert "not of the same plan" in compare_text(recorded(), other)


def _svgs(page: str) -> list[ET.Element]:
    return [ET.fromstring(m) for m in re.findall(r"<svg .*?</svg>", page, re.S)]


def test_html_timeline_plots_operations_faults_and_violations() -> None:
    a, b = recorded(), recorded("io.containerd.pyshim.v1", broken=False)
    page = html_page([a, b])
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    svg_a, svg_b = _svgs(page)
    ops = svg_a.findall(f"{SVG}rect[@class='op']")
    assert len(ops) == 5
    failed = [op for op in ops if op.get("stroke") == "#000"]
    assert len(failed) == 1 and "dial" in (failed[0].findtext(f"{SVG}title") or "")
    faults = svg_a.findall(f"{SVG}path[@class='fault']")
    assert [f.get("opacity") for f in faults] == ["1", "1", "0.3"]
    violations = svg_a.findall(f"{SVG}g[@class='violation']")
    assert len(violations) == 2 and len(svg_b.findall(f"{SVG}g[@class='violation']")) == 0
    # Placed by time: the step-4 violation at 4 s, the end-of-run one (step -1) further right.
    xs = [float(v.find(f"{SVG}path").get("d", "M0").split()[0][1:]) for v in violations]  # type: ignore[union-attr]
    assert xs[0] < xs[1]
    # Detail text is escaped, not markup.
    assert "got [&lt;1&gt;]" in page and "got [<1>]" not in page
    assert '<tr class="differ"><td>shim-kill</td>' in page


def test_cli_renders_recorded_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one, two = tmp_path / "a.json", tmp_path / "b.json"
    one.write_text(recorded().dumps())
    two.write_text(recorded("io.containerd.pyshim.v1", broken=False).dumps())
    assert cli.main(["--load", str(two)]) == 0
    assert cli.main(["--load", str(one), "--load", str(two), "--html", str(tmp_path / "r.html"),
                     "--json", str(tmp_path / "both.json")]) == 1  # fmt: skip
    out = capsys.readouterr().out
    assert "side by side: seed 9" in out
    assert (tmp_path / "r.html").read_text().count("<svg ") == 2
    # A comparison's JSON loads back as both runs.
    assert cli.main(["--load", str(tmp_path / "both.json")]) == 1
    assert cli.main(["--load", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_cli_refuses_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--fault-kinds", "shim-kill,nope", "--dry-run"]) == 2
    assert "unknown nope" in capsys.readouterr().err
    assert cli.main(["--faults", "-3", "--dry-run"]) == 2
    assert cli.main(["--driver", "manager", "--compare", "a", "b"]) == 2
    # A containerd the user runs is never killed, filled or slowed.
    assert cli.main(["--address", "/x.sock", "--fault-kinds", "daemon-kill", "--dry-run"]) == 2
    assert "--address" in capsys.readouterr().err
    assert cli.main(["--address", "/x.sock", "--ops", "60", "--faults", "30", "--dry-run"]) == 0
    planned = {line.split("!! ")[1].split()[0] for line in capsys.readouterr().out.splitlines()
               if "!! " in line}  # fmt: skip
    assert planned == {"shim-kill", "shim-stop", "client-kill"}
    with pytest.raises(SystemExit) as exc:
        cli.main(["--driver", "docker"])
    assert exc.value.code == 2


def test_fault_kinds_restrict_the_plan_and_keep_the_default_plan() -> None:
    only = generate(5, 80, 20, ("shim-kill", "client-kill"))
    assert {s.fault.kind for s in only.steps if s.fault} <= {"shim-kill", "client-kill"}
    assert sum(1 for s in only.steps if s.fault) == 20
    # The order they are named in does not matter; all kinds = the plan of old.
    assert generate(5, 80, 20, ("client-kill", "shim-kill")).dump() == only.dump()
    assert generate(5, 80, 20, FAULT_KINDS).dump() == generate(5, 80, 20).dump()
    with pytest.raises(ValueError, match="fault kinds"):
        generate(5, 80, 20, ("bogus",))


def test_replay_takes_the_plan_from_a_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r = recorded()
    r.planned_ops, r.planned_faults, r.fault_kinds = 30, 7, ["shim-stop", "slow-runc"]
    path = tmp_path / "r.json"
    path.write_text(r.dumps())
    assert cli.main(["--replay", str(path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == generate(9, 30, 7, ("shim-stop", "slow-runc")).dump()
    # The command line wins over the result.
    assert cli.main(["--replay", str(path), "--seed", "4", "--dry-run"]) == 0
    assert capsys.readouterr().out.strip() == generate(4, 30, 7, ("shim-stop", "slow-runc")).dump()


class _Ids:
    name = "fake"
    runtime = "rt"

    def __init__(self) -> None:
        self.ids = {"c0": "c0", "c1": "c1", "c12": "c12"}


def _runner(plan: Plan) -> Runner:
    """A runner that has run ``plan``: every step recorded, every fault fired."""
    r = Runner(cast(Driver, _Ids()), plan)
    for s in plan.steps:
        kind = s.fault.kind if s.fault else ""
        record = StepRecord(s.index, s.op.kind, s.op.slot, s.describe(), 0.0, 0.0, fault=kind)
        record.fired = bool(kind)
        r.report.timeline.append(record)
    return r


def test_a_violation_gets_its_containers_steps_and_the_faults_since_its_first() -> None:
    plan = generate(11, 40, 12)
    r = _runner(plan)
    slot = plan.steps[5].op.slot
    mine = [s.index for s in plan.steps if s.op.slot == slot or (s.fault and s.fault.slot == slot)]
    faults = [s.index for s in plan.steps if s.fault and s.fault.kind == "daemon-kill"]
    faults = [i for i in faults if mine[0] <= i]
    assert faults, "the plan should have a daemon kill after the container's first step"
    assert r.history(slot, -1) == sorted(set(mine) | set(faults))
    until = r.history(slot, mine[1])
    assert until[-1] == mine[1] and mine[0] in until
    # A leftover names its container by id; c1 is not c12.
    r.report.violations = [Violation("leak", -1, "cgroup /sys/fs/cgroup/ns/c12 left")]
    r._attach_history()
    v = r.report.violations[0]
    assert v.container == "c12" and v.steps == r.history("c12", -1)
    # A lost exit is reported at the container's first step; its whole life is its history.
    first = mine[0]
    r.report.violations = [Violation("exit-unknown", first, f"{slot} init: no exit", slot)]
    r._attach_history()
    assert r.report.violations[0].steps == r.history(slot, -1) != r.history(slot, first)


def test_findings_are_blamed_on_the_faults_that_hit_their_container() -> None:
    plan = Plan(1)
    plan.steps = [
        Step(0, Op("run", "c0", mode="serve")),
        Step(1, Op("run", "c1", mode="serve"), Fault("shim-kill", 0.0, slot="c0")),
        Step(2, Op("exec", "c1", exec_id="c1-e0"), Fault("disk-full", 0.0, steps=2)),
        Step(3, Op("status", "c0")),
        Step(4, Op("kill", "c1", signal=15), Fault("daemon-kill", 0.0)),
        Step(5, Op("delete", "c0")),
        Step(6, Op("delete", "c1")),
    ]
    r = _runner(plan)
    # Its shim was killed, and its status step came while the disk was still full.
    assert r.blame("c0", -1) == ["disk-full", "shim-kill"]
    # Another container's shim is not its own; the daemon died during its kill.
    assert r.blame("c1", -1) == ["daemon-kill", "disk-full"]
    # A finding made at step 4 is blamed on that step's fault too.
    assert r.blame("c0", 4) == ["daemon-kill", "disk-full", "shim-kill"]
    assert r.blame("c0", 0) == []
    r.report.timeline[1].fired = False  # the shim had gone: nothing was hit
    assert r.blame("c0", -1) == ["disk-full"]
