"""The pure parts of the shim benchmarks: statistics, round order, report text."""

from __future__ import annotations

import pytest

from bench.scenarios import _checkpoints
from bench.stats import (
    MetricRow,
    Summary,
    format_markdown,
    format_table,
    percentile,
    ratio,
    round_order,
    rows_from_results,
    summarize,
)


def test_percentile_interpolates_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile([5.0], 90) == 5.0


def test_percentile_ignores_input_order() -> None:
    assert percentile([9.0, 1.0, 5.0], 50) == 5.0


@pytest.mark.parametrize("q", [-1.0, 100.5])
def test_percentile_rejects_out_of_range(q: float) -> None:
    with pytest.raises(ValueError):
        percentile([1.0], q)


def test_percentile_rejects_empty() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize() -> None:
    s = summarize([3.0, 1.0, 2.0, 10.0])
    assert s is not None
    assert s.p90 == pytest.approx(7.9)
    assert s == Summary(n=4, median=2.5, p90=s.p90, mean=4.0, min=1.0, max=10.0)
    assert summarize([]) is None


def test_ratio_is_py_over_go_and_none_when_undefined() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


def test_round_order_alternates() -> None:
    assert round_order(0, ["go", "py"]) == ["go", "py"]
    assert round_order(1, ["go", "py"]) == ["py", "go"]
    assert round_order(2, ["go", "py"]) == ["go", "py"]
    assert round_order(3, ["go"]) == ["go"]


def test_round_order_does_not_mutate_its_input() -> None:
    runtimes = ["go", "py"]
    round_order(1, runtimes)
    assert runtimes == ["go", "py"]


def _row(go: list[float] | None, py: list[float] | None) -> MetricRow:
    return MetricRow(
        scenario="cold_run",
        metric="wall",
        unit="ms",
        go=summarize(go) if go else None,
        py=summarize(py) if py else None,
    )


def test_ratio_median() -> None:
    assert _row([100.0, 120.0, 140.0], [300.0, 360.0]).ratio_median == pytest.approx(330 / 120)
    assert _row([100.0], None).ratio_median is None


def test_format_table_aligns_and_shows_missing_side() -> None:
    text = format_table([_row([100.0, 120.0, 140.0], [300.0, 360.0]), _row([5.5], None)])
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["scenario", "metric", "Go"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert "2.75x" in lines[2]
    assert lines[2].endswith("3/2")
    assert lines[3].split()[-2:] == ["-", "1/0"]
    assert "5.50" in lines[3]


def test_format_markdown_is_a_table() -> None:
    text = format_markdown([_row([100.0], [250.0])])
    lines = text.splitlines()
    assert len(lines) == 3
    assert all(line.startswith("| ") or line.startswith("|") for line in lines)
    assert lines[2] == "| cold_run | wall [ms] | 100 | 100 | 250 | 250 | 2.50x | 1/1 |"


def test_rows_from_results_round_trips_the_json_shape() -> None:
    go = summarize([1.0, 2.0])
    assert go is not None
    results = {
        "stdout_throughput": {
            "metrics": {
                "rate": {
                    "unit": "MB/s",
                    "higher_is_better": True,
                    "samples": {"go": [1.0, 2.0]},
                    "summary": {"go": go.to_json()},
                }
            },
            "errors": {"py": ["boom"]},
        },
        "idle": {"metrics": {}, "errors": {}},
    }
    (row,) = rows_from_results(results)
    assert row.scenario == "stdout_throughput"
    assert row.unit == "MB/s"
    assert row.higher_is_better
    assert row.go == go
    assert row.py is None


def test_scale_checkpoints() -> None:
    assert _checkpoints(1) == [1]
    assert _checkpoints(20) == [1, 2, 5, 10, 20]
    assert _checkpoints(100) == [1, 2, 5, 10, 20, 50, 100]
    assert _checkpoints(1000)[-3:] == [200, 500, 1000]
