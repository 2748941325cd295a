"""bench/plot.py draws whatever subset of scenarios a results file holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is the optional `bench` extra")

from bench.plot import plot_results


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
