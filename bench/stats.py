"""Pure helpers for the shim benchmarks: summaries, ratios, round order, report text.

Nothing here touches processes or files, so all of it is unit tested.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "MetricRow",
    "Summary",
    "format_markdown",
    "format_table",
    "joined_increment_kb",
    "parse_counts",
    "per_container_mb",
    "percentile",
    "pod_grouping_problems",
    "pod_owners",
    "ratio",
    "round_order",
    "rows_from_results",
    "scale_scenario_count",
    "scale_scenario_name",
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


def parse_counts(text: str) -> tuple[int, ...]:
    """``--scale 100,1000``: distinct positive counts, smallest first."""
    words = [w.strip() for w in text.split(",")]
    if not all(w.isdigit() for w in words):
        raise ValueError(f"not a comma list of counts: {text!r}")
    counts = [int(w) for w in words]
    if min(counts) < 1:
        raise ValueError(f"counts must be at least 1: {text!r}")
    if len(set(counts)) != len(counts):
        raise ValueError(f"repeated count in {text!r}")
    return tuple(sorted(counts))


_SCALE_NAME = re.compile(r"scale(\d*)")


def scale_scenario_name(count: int, counts: Sequence[int]) -> str:
    """Results key of the scale series with ``count`` containers.

    A lone series keeps the plain name, so ``--scale 20`` reports (and older
    results files read) exactly as before; several get the count appended.
    """
    return "scale" if len(counts) == 1 else f"scale{count}"


def scale_scenario_count(name: str, body: Mapping[str, Any]) -> int | None:
    """The container count of a scale series in a results file, None if ``name``
    is not one. Files from before several series existed carry no count: there
    the last checkpoint is the count."""
    match = _SCALE_NAME.fullmatch(name)
    if match is None:
        return None
    if "containers" in body:
        return int(body["containers"])
    if match.group(1):
        return int(match.group(1))
    points = [p for series in body.get("series", {}).values() for p in series]
    return max((int(p["containers"]) for p in points), default=None)


def per_container_mb(total_kb: float, containers: int) -> float:
    if containers < 1:
        raise ValueError("per-container figure of no containers")
    return total_kb / containers / 1024


def pod_owners(pods: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Shim ``-id`` -> pod: a shim daemon of a pod was started with the id of the pod's
    first container, or is named for the pod itself when found by its socket."""
    owner = {cid: pod for pod, cids in pods.items() for cid in cids}
    owner.update((pod, pod) for pod in pods)
    return owner


def joined_increment_kb(first_kb: int, last_kb: int, size: int) -> float:
    """What a pod's shim grew by per container that joined it after the first."""
    if size < 2:
        raise ValueError("a pod of one container has no joined containers")
    return (last_kb - first_kb) / (size - 1)


def pod_grouping_problems(shim_ids: Sequence[str], pods: Mapping[str, Sequence[str]]) -> list[str]:
    """What is wrong with a pod fleet's shims, given the ``-id`` each shim daemon
    was started with (the pod's first container; or the pod itself, for a shim found
    by its socket, which is named for the pod) and each pod's containers.
    Empty when there is exactly one shim per pod."""
    owner = pod_owners(pods)
    problems: list[str] = []
    if len(shim_ids) != len(pods):
        problems.append(f"{len(shim_ids)} shim processes for {len(pods)} pods")
    served: dict[str, int] = {}
    for sid in shim_ids:
        pod = owner.get(sid)
        if pod is None:
            problems.append(f"shim for {sid!r} belongs to no pod")
        else:
            served[pod] = served.get(pod, 0) + 1
    problems.extend(f"pod {pod} has {n} shims" for pod, n in sorted(served.items()) if n > 1)
    problems.extend(f"pod {pod} has no shim" for pod in pods if pod not in served)
    return problems
