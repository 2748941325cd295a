"""Reports from recorded results: text, JSON, a side-by-side comparison, and HTML with
a timeline of the plan (operations, faults, violations over time) as inline SVG.

Everything here reads a Report (crashtest.result) and nothing else, so a result kept
with ``--json`` renders the same later (``--load``).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field

from crashtest.plan import FAULT_KINDS
from crashtest.result import Report, StepRecord, category

__all__ = [
    "GUARANTEES",
    "FaultRow",
    "compare_text",
    "fault_rows",
    "guarantees",
    "html_page",
    "text",
]

# Findings no fault hit the container of.
NO_FAULT = "no fault on it"
# What a runtime author asks of a run, per fault kind: (name, what breaks it).
GUARANTEES: tuple[tuple[str, str], ...] = (
    ("exits right", "a lost, wrong or twice-reported exit status (violation)"),
    ("real exit kept", "an exit reported as 137 because the shim died first (allowed)"),
    ("exit events delivered", "no /tasks/exit event for an exit other sources reported"),
    ("events in order", "an event before the one it must follow (violation)"),
    ("nothing left behind", "a leak, orphan, zombie or unlisted live shim (violation)"),
)


@dataclass
class FaultRow:
    kind: str
    planned: int = 0
    fired: int = 0
    failed_ops: int = 0
    violations: dict[str, int] = field(default_factory=dict)  # category -> count
    degraded: dict[str, int] = field(default_factory=dict)  # kind -> count

    def broken(self) -> dict[str, int]:
        """Guarantee -> how many findings broke it (absent: kept)."""
        out = {
            "exits right": self.violations.get("exits", 0),
            "real exit kept": self.degraded.get("exit-lost-to-137", 0),
            "exit events delivered": self.degraded.get("exit-event-missing", 0),
            "events in order": self.violations.get("events", 0),
            "nothing left behind": self.violations.get("resources", 0),
        }
        return {k: v for k, v in out.items() if v}


def fault_rows(report: Report) -> list[FaultRow]:
    """Per fault kind (and "no fault on it" for findings about a container no fault hit):
    how often it was planned and fired, the operations that failed under it, and the
    findings about the containers it hit (Runner.blame)."""
    kinds = [k for k in FAULT_KINDS if k in report.fault_kinds or k in report.faults]
    rows = {k: FaultRow(k) for k in [*kinds, NO_FAULT]}
    for k, n in report.faults.items():
        rows.setdefault(k, FaultRow(k)).planned = n
    for r in report.timeline:
        if r.fault:
            row = rows.setdefault(r.fault, FaultRow(r.fault))
            row.fired += r.fired
            row.failed_ops += r.outcome == "error"
    for v in report.violations:
        for k in v.fault_kinds or [NO_FAULT]:
            row = rows.setdefault(k, FaultRow(k))
            cat = category(v.kind)
            row.violations[cat] = row.violations.get(cat, 0) + 1
    for d in report.degraded:
        for k in d.fault_kinds or [NO_FAULT]:
            row = rows.setdefault(k, FaultRow(k))
            row.degraded[d.kind] = row.degraded.get(d.kind, 0) + 1
    return list(rows.values())


def guarantees(report: Report) -> dict[str, dict[str, str]]:
    """fault kind -> guarantee -> "kept" / "broken (n)" / "not exercised"."""
    out: dict[str, dict[str, str]] = {}
    for row in fault_rows(report):
        broken = row.broken()
        exercised = row.fired > 0 or row.kind == NO_FAULT
        out[row.kind] = {
            g: (
                f"broken ({broken[g]})" if g in broken else "kept" if exercised else "not exercised"
            )
            for g, _ in GUARANTEES
        }
    return out


def _steps(report: Report) -> dict[int, StepRecord]:
    return {r.index: r for r in report.timeline}


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items())) or "-"


def text(report: Report, verbose: bool = False) -> str:
    r = report
    lines = [f"crash harness: {r.driver} / {r.runtime}, seed {r.seed}"]
    if r.host:
        lines.append(f"  containerd: {r.host}")
    lines.append(f"  steps {r.steps}, client commands {r.commands}, {r.seconds:.1f}s")
    lines.append("  operations: " + ", ".join(f"{k}={v}" for k, v in sorted(r.ops.items())))
    lines.append(
        "  faults:     " + (", ".join(f"{k}={v}" for k, v in sorted(r.faults.items())) or "none")
    )
    lines.append(f"  faults with nothing to hit (no live shim): {r.faults_skipped}")
    lines.append(
        f"  failed operations (expected under faults): {r.op_errors}"
        f"; unsupported by this driver: {r.unsupported}"
    )
    if verbose and r.errors:
        lines += ["  operation errors:"] + [f"    {e}" for e in r.errors]
    if r.tolerated:
        lines.append(f"  tolerated by definition: {len(r.tolerated)}")
        lines += [f"    {t}" for t in r.tolerated]
    lines.append("  per fault kind (findings counted under every fault that hit their container):")
    rows = [
        (
            row.kind,
            row.planned,
            row.fired,
            row.failed_ops,
            _counts(row.violations),
            _counts(row.degraded),
        )
        for row in fault_rows(r)
        if row.planned or row.violations or row.degraded
    ]
    header = ("fault", "planned", "fired", "failed-ops", "violations", "weaker-guarantees")
    lines += [f"    {t}" for t in _table(header, rows)]
    if r.degraded:
        lines.append(f"  weaker guarantees (allowed, not violations): {len(r.degraded)}")
        lines += [f"    [{d.kind}] {d.detail}" for d in r.degraded[: None if verbose else 10]]
        if not verbose and len(r.degraded) > 10:
            lines.append(f"    ... {len(r.degraded) - 10} more (-v)")
    lines.append(f"  violations: {len(r.violations)}")
    steps = _steps(r)
    for v in r.violations:
        lines.append(f"    {v.describe(r.seed)}")
        if v.steps:
            lines.append("      steps that led to it:")
            for i in v.steps:
                s = steps.get(i)
                if s is not None:
                    extra = f"  -> {s.outcome}" if s.outcome != "ok" else ""
                    lines.append(f"        {s.text}{extra}")
        if v.records:
            lines.append("      records: " + "; ".join(v.records))
        lines += [f"      evidence: {e}" for e in v.evidence]
    if r.evidence:
        lines.append("  evidence:")
        lines += [f"    {e}" for e in r.evidence]
    replay = (
        f"pyshim-crashtest --driver {r.driver} --runtime {r.runtime} --seed {r.seed} "
        f"--ops {r.planned_ops} --faults {r.planned_faults}"
    )
    if r.fault_kinds and sorted(r.fault_kinds) != sorted(FAULT_KINDS):
        replay += f" --fault-kinds {','.join(r.fault_kinds)}"
    lines.append(f"  replay: {replay}")
    lines.append(r.summary())
    return "\n".join(lines)


def _label(r: Report) -> str:
    return f"{r.runtime}" + (f" ({r.host})" if r.host else "")


def compare_text(a: Report, b: Report) -> str:
    """The same plan against two runtimes: per fault kind and guarantee, where they differ."""
    lines = [f"side by side: seed {a.seed}, {a.planned_ops} ops, {a.planned_faults} faults"]
    if (a.seed, a.planned_ops, a.planned_faults, a.fault_kinds) != (
        b.seed,
        b.planned_ops,
        b.planned_faults,
        b.fault_kinds,
    ):
        lines.append("  WARNING: the two results are not of the same plan")
    lines.append(f"  A: {_label(a)}: {a.summary()}")
    lines.append(f"  B: {_label(b)}: {b.summary()}")
    ga, gb = guarantees(a), guarantees(b)
    rows = []
    differ = 0
    for kind in [k for k in ga if k in gb]:
        for g, _ in GUARANTEES:
            va, vb = ga[kind][g], gb[kind][g]
            mark = "*" if va != vb and "not exercised" not in (va, vb) else ""
            differ += mark == "*"
            rows.append((mark, kind, g, va, vb))
    lines.append("  guarantees per fault kind (* = the runtimes differ):")
    lines += [f"    {t}" for t in _table(("", "fault", "guarantee", "A", "B"), rows)]
    lines.append(f"  {differ} difference(s)")
    for label, r in (("A", a), ("B", b)):
        for v in r.violations:
            lines.append(f"  {label} violation: {v.describe(r.seed)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- HTML

OP_COLORS = {
    "run": "#4c78a8",
    "exec": "#72b7b2",
    "kill": "#e45756",
    "pause": "#b279a2",
    "resume": "#9d755d",
    "status": "#bab0ac",
    "delete": "#54a24b",
}
FAULT_COLORS = {
    "daemon-kill": "#d62728",
    "shim-kill": "#ff7f0e",
    "shim-stop": "#bcbd22",
    "disk-full": "#8c564b",
    "client-kill": "#9467bd",
    "slow-runc": "#17becf",
}
LANE = 9
LEFT = 70
WIDTH = 1000

CSS = """body{font:14px sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px}
th{background:#f3f3f3}.kept{background:#e6f4e6}.broken{background:#fbe3e3}
.differ{font-weight:bold}pre{background:#f8f8f8;padding:.5em;white-space:pre-wrap}
svg text{font:10px sans-serif}"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def timeline_svg(report: Report) -> str:
    """Operations per container lane, faults and violations on lanes of their own."""
    tl = report.timeline
    total = max([report.seconds, *(s.end for s in tl), 0.001])
    lanes: list[str] = []
    for s in tl:
        if s.slot and s.slot not in lanes:
            lanes.append(s.slot)
    top = 20
    rows = ["faults", "violations", *lanes]
    height = top + LANE * len(rows) + 20
    scale = (WIDTH - LEFT - 10) / total

    def x(t: float) -> float:
        return LEFT + t * scale

    def y(row: str) -> float:
        return top + rows.index(row) * LANE

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" role="img">',
        f"<title>timeline: {_e(report.runtime)} seed {report.seed}</title>",
    ]
    for i in range(11):
        t = total * i / 10
        out.append(
            f'<line x1="{x(t):.1f}" y1="{top - 4}" x2="{x(t):.1f}" y2="{height - 18}" '
            'stroke="#eee"/>'
            f'<text x="{x(t):.1f}" y="{height - 6}" text-anchor="middle">{t:.0f}s</text>'
        )
    for row in rows:
        label = row if len(row) <= 10 else row[:9] + "…"
        out.append(
            f'<text x="{LEFT - 4}" y="{y(row) + LANE - 2}" text-anchor="end">{_e(label)}</text>'
        )
    for s in tl:
        if s.slot:
            w = max(x(s.end) - x(s.start), 1.5)
            stroke = ' stroke="#000" stroke-width="1"' if s.outcome == "error" else ""
            tip = s.text + (f" -> {s.outcome}: {'; '.join(s.errors)}" if s.outcome != "ok" else "")
            out.append(
                f'<rect class="op" x="{x(s.start):.1f}" y="{y(s.slot) + 1}" width="{w:.1f}" '
                f'height="{LANE - 2}" fill="{OP_COLORS.get(s.op, "#888")}"{stroke}>'
                f"<title>{_e(tip)}</title></rect>"
            )
        if s.fault:
            cx, cy = x(s.start), y("faults") + LANE / 2
            opacity = "1" if s.fired else "0.3"
            out.append(
                f'<path class="fault" d="M{cx:.1f} {cy - 4:.1f} L{cx + 4:.1f} {cy + 4:.1f} '
                f'L{cx - 4:.1f} {cy + 4:.1f} Z" fill="{FAULT_COLORS.get(s.fault, "#000")}" '
                f'opacity="{opacity}"><title>#{s.index} {_e(s.fault_text)}'
                f"{'' if s.fired else ' (nothing to hit)'}</title></path>"
            )
    steps = _steps(report)
    for v in report.violations:
        at = steps.get(v.step)
        t = at.start if at is not None else total
        cx, cy = x(t), y("violations") + LANE / 2
        out.append(
            f'<g class="violation"><title>{_e(v.describe(report.seed))}</title>'
            f'<path d="M{cx - 4:.1f} {cy - 4:.1f} L{cx + 4:.1f} {cy + 4:.1f} M{cx + 4:.1f} '
            f'{cy - 4:.1f} L{cx - 4:.1f} {cy + 4:.1f}" stroke="#c00" stroke-width="2"/></g>'
        )
    out.append("</svg>")
    return "\n".join(out)


def _legend() -> str:
    ops = " ".join(f'<span style="color:{c}">&#9632;</span> {_e(k)}' for k, c in OP_COLORS.items())
    faults = " ".join(
        f'<span style="color:{c}">&#9650;</span> {_e(k)}' for k, c in FAULT_COLORS.items()
    )
    return (
        f"<p>operations: {ops} (black outline: failed)<br>faults: {faults} (faded: nothing "
        'to hit)<br>violations: <span style="color:#c00">&#10007;</span></p>'
    )


def _css_class(verdict: str) -> str:
    return "kept" if verdict == "kept" else "broken" if verdict.startswith("broken") else ""


def _guarantee_table(runs: Sequence[Report]) -> str:
    gs = [guarantees(r) for r in runs]
    kinds = [k for k in gs[0] if all(k in g for g in gs)]
    head = "".join(f"<th>{_e(_label(r))}</th>" for r in runs)
    out = [f"<table><tr><th>fault</th><th>guarantee</th>{head}</tr>"]
    for kind in kinds:
        for g, why in GUARANTEES:
            values = [x[kind][g] for x in gs]
            real = [v for v in values if v != "not exercised"]
            differ = len(set(real)) > 1
            cells = "".join(f'<td class="{_css_class(v)}">{_e(v)}</td>' for v in values)
            cls = ' class="differ"' if differ else ""
            out.append(
                f'<tr{cls}><td>{_e(kind)}</td><td title="{_e(why)}">{_e(g)}</td>{cells}</tr>'
            )
    out.append("</table>")
    return "\n".join(out)


def _run_section(r: Report) -> str:
    rows = "".join(
        f"<tr><td>{_e(row.kind)}</td><td>{row.planned}</td><td>{row.fired}</td>"
        f"<td>{row.failed_ops}</td><td>{_e(_counts(row.violations))}</td>"
        f"<td>{_e(_counts(row.degraded))}</td></tr>"
        for row in fault_rows(r)
        if row.planned or row.violations or row.degraded
    )
    steps = _steps(r)
    vio = []
    for v in r.violations:
        chain = "\n".join(
            steps[i].text + (f"  -> {steps[i].outcome}" if steps[i].outcome != "ok" else "")
            for i in v.steps
            if i in steps
        )
        vio.append(
            f"<li><b>{_e(v.describe(r.seed))}</b><pre>{_e(chain)}</pre>"
            + (f"<pre>{_e(chr(10).join(v.records))}</pre>" if v.records else "")
            + (f"<pre>{_e(chr(10).join(v.evidence))}</pre>" if v.evidence else "")
            + "</li>"
        )
    degraded = "".join(f"<li>[{_e(d.kind)}] {_e(d.detail)}</li>" for d in r.degraded)
    return (
        f"<h2>{_e(_label(r))} ({_e(r.driver)} driver)</h2>"
        f"<p>{_e(r.summary())}</p>"
        f"{timeline_svg(r)}"
        "<h3>Per fault kind</h3><table><tr><th>fault</th><th>planned</th><th>fired</th>"
        "<th>failed ops</th><th>violations</th><th>weaker guarantees</th></tr>"
        f"{rows}</table>"
        f"<h3>Violations ({len(r.violations)})</h3><ul>{''.join(vio) or '<li>none</li>'}</ul>"
        f"<h3>Weaker guarantees ({len(r.degraded)})</h3><ul>{degraded or '<li>none</li>'}</ul>"
    )


def html_page(runs: Sequence[Report]) -> str:
    """One self-contained page: the guarantees table, then each run with its timeline."""
    if not runs:
        raise ValueError("no result to render")
    first = runs[0]
    title = f"crashtest seed {first.seed}: " + " vs ".join(r.runtime for r in runs)
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1>"
        f"<p>plan: seed {first.seed}, {first.planned_ops} operations, "
        f"{first.planned_faults} faults of {_e(', '.join(first.fault_kinds))}</p>"
        f"<h2>Guarantees per fault kind</h2>{_guarantee_table(runs)}"
        f"{_legend()}" + "".join(_run_section(r) for r in runs) + "</body></html>\n"
    )
