"""bench/plot.py draws whatever subset of scenarios a results file holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is the optional `bench` extra")

from bench.plot import _scale_series, plot_results


def _metric(unit: str, go: list[float], py: list[float]) -> dict[str, Any]:
    return {"unit": unit, "samples": {"go": go, "py": py}}


def test_plot_with_latencies_memory_and_scale(tmp_path: Path) -> None:
    report: dict[str, Any] = {
        "meta": {"date": "2026-01-01", "cpus": 2, "containerd": "1.6.20"},
        "scenarios": {
            "cold_run": {"metrics": {"wall": _metric("ms", [100.0, 120.0], [300.0, 310.0])}},
            "idle": {
                "metrics": {
                    "pss_per_shim": {
                        "unit": "MB",
                        "samples": {"go": [4.0], "py": [19.0]},
                        "summary": {"go": {"median": 4.0}, "py": {"median": 19.0}},
                    }
                }
            },
            "scale": {
                "metrics": {},
                "series": {
                    "go": [{"containers": 1, "rss_kb": 13000, "pss_kb": 12000}],
                    "py": [{"containers": 1, "rss_kb": 31000, "pss_kb": 20000}],
                },
            },
        },
    }
    out = tmp_path / "shims.png"
    plot_results(report, out)
    assert out.read_bytes().startswith(b"\x89PNG")


def test_plot_with_one_runtime_and_nothing_else(tmp_path: Path) -> None:
    report: dict[str, Any] = {
        "scenarios": {"exec": {"metrics": {"wall": _metric("ms", [60.0], [])}}},
    }
    out = tmp_path / "go-only.png"
    plot_results(report, out)
    assert out.stat().st_size > 0


def _points(counts: list[int], kb_each: int) -> list[dict[str, int]]:
    return [{"containers": n, "rss_kb": n * kb_each * 2, "pss_kb": n * kb_each} for n in counts]


def test_scale_series_are_found_old_and_new_style() -> None:
    old = {"scale": {"metrics": {}, "series": {"go": _points([1, 2, 5], 3000)}}}
    assert [n for n, _, _ in _scale_series({"scenarios": old})] == [5]
    new = {
        "scale1000": {"containers": 1000, "series": {"py": _points([1, 1000], 8000)}},
        "scale100": {"containers": 100, "series": {"py": _points([1, 100], 8000)}},
        "scale5": {"containers": 5, "series": {}},  # a series that never got going
        "pods": {"metrics": {}, "series": {"py": _points([1], 1)}},
    }
    found = _scale_series({"scenarios": new})
    assert [(n, name) for n, name, _ in found] == [(100, "scale100"), (1000, "scale1000")]
    assert found[1][2]["py"][-1]["containers"] == 1000


def test_plot_with_several_scale_series_and_pods(tmp_path: Path) -> None:
    report: dict[str, Any] = {
        "config": {"pods": 5, "pod_size": 4},
        "scenarios": {
            "pods": {
                "metrics": {
                    "pss_per_container": {
                        "unit": "MB",
                        "samples": {"go": [1.0], "py": [3.0]},
                        "summary": {"go": {"median": 1.0}, "py": {"median": 3.0}},
                    }
                }
            },
            "scale10": {
                "containers": 10,
                "series": {"go": _points([1, 10], 3000), "py": _points([1, 10], 8000)},
            },
            "scale20": {
                "containers": 20,
                "series": {"go": _points([1, 20], 3000), "py": _points([1, 20], 8000)},
            },
        },
    }
    out = tmp_path / "several.png"
    plot_results(report, out)
    assert out.read_bytes().startswith(b"\x89PNG")


def test_plot_with_a_full_row_and_no_memory_panels(tmp_path: Path) -> None:
    # Four distributions fill the one row exactly: no memory panel may ask for a fifth axis.
    report: dict[str, Any] = {
        "scenarios": {
            "cold_run": {"metrics": {"wall": _metric("ms", [1.0], [2.0])}},
            "exec": {"metrics": {"wall": _metric("ms", [1.0], [2.0])}},
            "tty": {"metrics": {"first_byte": _metric("ms", [1.0], [2.0])}},
            "pods": {"metrics": {"pod_start": _metric("ms", [1.0], [2.0])}},
        }
    }
    out = tmp_path / "row.png"
    plot_results(report, out)
    assert out.read_bytes().startswith(b"\x89PNG")
