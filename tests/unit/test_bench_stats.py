"""The pure parts of the shim benchmarks: statistics, round order, report text."""

from __future__ import annotations

import pytest

from bench.scenarios import BenchConfig, _checkpoints, result_names
from bench.stats import (
    MetricRow,
    Summary,
    format_markdown,
    format_table,
    joined_increment_kb,
    parse_counts,
    per_container_mb,
    percentile,
    pod_grouping_problems,
    pod_owners,
    ratio,
    round_order,
    rows_from_results,
    scale_scenario_count,
    scale_scenario_name,
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


def test_parse_counts() -> None:
    assert parse_counts("20") == (20,)
    assert parse_counts("1000, 100") == (100, 1000)


@pytest.mark.parametrize("text", ["", "0", "10,", "ten", "-5", "5,5", "1.5"])
def test_parse_counts_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_counts(text)


def test_scale_scenario_names_keep_a_lone_series_plain() -> None:
    assert scale_scenario_name(20, (20,)) == "scale"
    assert [scale_scenario_name(n, (100, 1000)) for n in (100, 1000)] == ["scale100", "scale1000"]
    assert result_names("scale", BenchConfig(scale_containers=(5, 10))) == ["scale5", "scale10"]
    assert result_names("scale", BenchConfig()) == ["scale"]
    assert result_names("pods", BenchConfig()) == ["pods"]


def test_scale_scenario_count() -> None:
    points = {"go": [{"containers": 1}, {"containers": 20}], "py": [{"containers": 1}]}
    # A file from before --scale took a list: no count field, the last checkpoint says it.
    assert scale_scenario_count("scale", {"series": points}) == 20
    assert scale_scenario_count("scale", {"containers": 7, "series": points}) == 7
    assert scale_scenario_count("scale100", {"series": {}}) == 100
    assert scale_scenario_count("scale", {"metrics": {}}) is None
    assert scale_scenario_count("scaled", {"containers": 3}) is None
    assert scale_scenario_count("idle", {"containers": 3}) is None


def test_per_container_mb() -> None:
    assert per_container_mb(20 * 1024, 4) == 5.0
    with pytest.raises(ValueError):
        per_container_mb(1024, 0)


PODS = {"pod-go-0": ["pod-go-0-c-go-1", "pod-go-0-c-go-2"], "pod-go-3": ["pod-go-3-c-go-4"]}


def test_pod_grouping_one_shim_per_pod_is_fine() -> None:
    assert pod_grouping_problems(["pod-go-3-c-go-4", "pod-go-0-c-go-1"], PODS) == []


def test_pod_grouping_takes_a_shim_found_by_its_pod_socket() -> None:
    # A forked shim that cannot show its own command line is found by its socket,
    # which is named for the pod, not for the pod's first container.
    assert pod_grouping_problems(["pod-go-3", "pod-go-0"], PODS) == []
    assert "pod pod-go-0 has 2 shims" in pod_grouping_problems(
        ["pod-go-0", "pod-go-0-c-go-1", "pod-go-3"], PODS
    )


def test_pod_grouping_reports_a_shim_per_container() -> None:
    problems = pod_grouping_problems(
        ["pod-go-0-c-go-1", "pod-go-0-c-go-2", "pod-go-3-c-go-4"], PODS
    )
    assert problems == ["3 shim processes for 2 pods", "pod pod-go-0 has 2 shims"]


def test_pod_grouping_reports_missing_and_foreign_shims() -> None:
    problems = pod_grouping_problems(["idle-go-9"], PODS)
    assert problems == [
        "1 shim processes for 2 pods",
        "shim for 'idle-go-9' belongs to no pod",
        "pod pod-go-0 has no shim",
        "pod pod-go-3 has no shim",
    ]


def test_pod_owners_name_a_pod_by_any_of_its_containers_or_itself() -> None:
    owners = pod_owners(PODS)
    assert owners["pod-go-0-c-go-2"] == "pod-go-0"
    assert owners["pod-go-3"] == "pod-go-3"
    assert "idle-go-9" not in owners


def test_joined_increment_is_per_container_after_the_first() -> None:
    assert joined_increment_kb(7000, 7300, 4) == 100.0
    assert joined_increment_kb(7000, 6900, 2) == -100.0  # a shim may also shrink
    with pytest.raises(ValueError):
        joined_increment_kb(7000, 7000, 1)
