"""Pure helpers for the shim benchmarks: summaries, ratios, round order, report text.

Nothing here touches processes or files, so all of it is unit tested.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "MetricRow",
    "Summary",
    "format_markdown",
    "format_table",
    "percentile",
    "ratio",
    "round_order",
    "rows_from_results",
    "summarize",
]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return float(ordered[lo])
    frac = pos - lo
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * frac)


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    p90: float
    mean: float
    min: float
    max: float

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary | None:
    if not values:
        return None
    return Summary(
        n=len(values),
        median=percentile(values, 50),
        p90=percentile(values, 90),
        mean=sum(values) / len(values),
        min=float(min(values)),
        max=float(max(values)),
    )


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """pyshim/Go; None when either side is missing or the Go side is zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def round_order(round_index: int, runtimes: Sequence[str]) -> list[str]:
    """A,B on even rounds and B,A on odd ones, so neither runtime always runs second
    (warm caches, thermal and neighbour drift then hit both alike)."""
    order = list(runtimes)
    if round_index % 2 == 1:
        order.reverse()
    return order


@dataclass(frozen=True)
class MetricRow:
    scenario: str
    metric: str
    unit: str
    go: Summary | None
    py: Summary | None
    # Throughput-like metrics are better when larger; the ratio is still py/go.
    higher_is_better: bool = False

    @property
    def ratio_median(self) -> float | None:
        return ratio(
            self.py.median if self.py else None,
            self.go.median if self.go else None,
        )


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cells(row: MetricRow) -> list[str]:
    ratio_median = row.ratio_median
    return [
        row.scenario,
        f"{row.metric} [{row.unit}]",
        _fmt(row.go.median if row.go else None),
        _fmt(row.go.p90 if row.go else None),
        _fmt(row.py.median if row.py else None),
        _fmt(row.py.p90 if row.py else None),
        "-" if ratio_median is None else f"{ratio_median:.2f}x",
        str(row.go.n if row.go else 0) + "/" + str(row.py.n if row.py else 0),
    ]


_HEADER = ["scenario", "metric", "Go med", "Go p90", "py med", "py p90", "py/Go", "n Go/py"]


def format_table(rows: Sequence[MetricRow]) -> str:
    """Fixed-width text table for the terminal."""
    table = [_HEADER, *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(_HEADER))]
    out = []
    for j, line in enumerate(table):
        out.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_markdown(rows: Sequence[MetricRow]) -> str:
    """GitHub table, the form pasted into bench/README.md."""
    lines = [
        "| " + " | ".join(_HEADER) + " |",
        "|" + "|".join(" --- " for _ in _HEADER) + "|",
    ]
    lines.extend("| " + " | ".join(_cells(r)) + " |" for r in rows)
    return "\n".join(lines)


def rows_from_results(scenarios: Mapping[str, Any]) -> list[MetricRow]:
    """Rebuild table rows from the ``scenarios`` part of shims.json."""
    rows: list[MetricRow] = []
    for scenario, body in scenarios.items():
        for metric, m in body.get("metrics", {}).items():
            summaries = m.get("summary", {})
            rows.append(
                MetricRow(
                    scenario=scenario,
                    metric=metric,
                    unit=m.get("unit", ""),
                    go=_summary_from_json(summaries.get("go")),
                    py=_summary_from_json(summaries.get("py")),
                    higher_is_better=bool(m.get("higher_is_better", False)),
                )
            )
    return rows


def _summary_from_json(data: Mapping[str, Any] | None) -> Summary | None:
    if not data:
        return None
    return Summary(
        n=int(data["n"]),
        median=float(data["median"]),
        p90=float(data["p90"]),
        mean=float(data["mean"]),
        min=float(data["min"]),
        max=float(data["max"]),
    )
