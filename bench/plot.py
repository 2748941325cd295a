"""bench/shims.png from bench/results/shims.json (needs the optional `bench` extra).

.venv/bin/python -m bench.plot [results.json] [out.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on the benchmark machines

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from bench.stats import scale_scenario_count

__all__ = ["plot_results"]

COLORS = {"go": "tab:blue", "py": "tab:orange"}
LABELS = {"go": "Go runc-v2", "py": "pyshim"}

# (scenario, metric, title) in the order the panels appear.
DISTRIBUTIONS: list[tuple[str, str, str]] = [
    ("cold_run", "wall", "ctr run --rm true"),
    ("create_start", "container_create", "container create"),
    ("create_start", "task_start", "task start -d"),
    ("kill_to_exit", "kill_to_exit_event", "kill -9 → /tasks/exit"),
    ("exec", "wall", "task exec true"),
    ("tty", "first_byte", "run -t: first output byte"),
    ("stdout_throughput", "rate", "stdout throughput"),
    ("pods", "pod_start", "run -d a pod's containers"),
    ("scale", "start_each", "run -d, one after another"),
    ("restart", "all_running", "containerd restart → all RUNNING"),
    ("idle", "wakeups_per_shim", "idle wake-ups per shim"),
]


def _metric(report: dict[str, Any], scenario: str, metric: str) -> dict[str, Any] | None:
    body = report.get("scenarios", {}).get(scenario, {})
    m: dict[str, Any] | None = body.get("metrics", {}).get(metric)
    return m


def _distribution(ax: Axes, m: dict[str, Any], title: str) -> None:
    keys = [k for k in ("go", "py") if m["samples"].get(k)]
    data = [m["samples"][k] for k in keys]
    parts = ax.boxplot(data, widths=0.5, showfliers=False, patch_artist=True)
    for patch, key in zip(parts["boxes"], keys, strict=True):
        patch.set_facecolor(COLORS[key])
        patch.set_alpha(0.35)
    for i, (key, values) in enumerate(zip(keys, data, strict=True), start=1):
        # Deterministic spread so the points do not hide each other.
        xs = [i + ((j % 7) - 3) * 0.04 for j in range(len(values))]
        ax.scatter(xs, values, s=8, color=COLORS[key], alpha=0.8, zorder=3)
    ax.set_xticks(range(1, len(keys) + 1), [LABELS[k] for k in keys])
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(m.get("unit", ""), fontsize=8)
    ax.tick_params(labelsize=8)
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)


IDLE_BARS = [("rss_per_shim", "RSS"), ("pss_per_shim", "PSS"), ("private_per_shim", "private")]
POD_BARS = [
    ("rss_per_container", "RSS"),
    ("pss_per_container", "PSS"),
    ("private_per_container", "private"),
]


def _idle_memory(ax: Axes, report: dict[str, Any]) -> bool:
    return _memory_bars(ax, report, "idle", IDLE_BARS, "memory per idle shim (median)")


def _pods_memory(ax: Axes, report: dict[str, Any]) -> bool:
    config = report.get("config", {})
    shape = f"{config.get('pods', '?')} pods x {config.get('pod_size', '?')}"
    return _memory_bars(ax, report, "pods", POD_BARS, f"shim memory per container, {shape}")


def _bar_heights(
    report: dict[str, Any], scenario: str, metrics: list[tuple[str, str]], key: str
) -> list[float]:
    heights = []
    for metric, _ in metrics:
        m = _metric(report, scenario, metric)
        summary = (m or {}).get("summary", {}).get(key)
        heights.append(summary["median"] if summary else 0.0)
    return heights


def _has_bars(report: dict[str, Any], scenario: str, metrics: list[tuple[str, str]]) -> bool:
    return any(any(_bar_heights(report, scenario, metrics, key)) for key in ("go", "py"))


def _memory_bars(
    ax: Axes,
    report: dict[str, Any],
    scenario: str,
    metrics: list[tuple[str, str]],
    title: str,
) -> bool:
    drawn = False
    width = 0.38
    for offset, key in ((-width / 2, "go"), (width / 2, "py")):
        heights = _bar_heights(report, scenario, metrics, key)
        if any(heights):
            drawn = True
            xs = [i + offset for i in range(len(metrics))]
            ax.bar(xs, heights, width, color=COLORS[key], label=LABELS[key])
            for x, h in zip(xs, heights, strict=True):
                ax.annotate(f"{h:.1f}", (x, h), ha="center", va="bottom", fontsize=7)
    if not drawn:
        return False
    ax.set_xticks(range(len(metrics)), [label for _, label in metrics])
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("MB", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7)
    return True


def _scale_series(
    report: dict[str, Any],
) -> list[tuple[int, str, dict[str, list[dict[str, Any]]]]]:
    """(count, scenario, {runtime: points}) of every scale series in the file,
    smallest first."""
    found = []
    for name, body in report.get("scenarios", {}).items():
        count = scale_scenario_count(name, body)
        if count is not None and any(body.get("series", {}).values()):
            found.append((count, name, body["series"]))
    return sorted(found, key=lambda item: item[0])


MARKERS = ["o", "s", "^", "D", "v"]


def _scale_memory(ax: Axes, report: dict[str, Any]) -> bool:
    all_series = _scale_series(report)
    if not all_series:
        return False
    several = len(all_series) > 1
    for index, (count, _, series) in enumerate(all_series):
        for key in ("go", "py"):
            points = series.get(key) or []
            if not points:
                continue
            xs = [p["containers"] for p in points]
            suffix = f", N={count}" if several else ""
            ax.plot(
                xs,
                [p["pss_kb"] / p["containers"] / 1024 for p in points],
                marker=MARKERS[index % len(MARKERS)],
                markersize=4 if several else 6,
                color=COLORS[key],
                alpha=1.0 if index == len(all_series) - 1 else 0.55,
                label=f"{LABELS[key]} PSS{suffix}",
            )
            if several:
                continue  # RSS of every series would hide the PSS lines
            ax.plot(
                xs,
                [p["rss_kb"] / p["containers"] / 1024 for p in points],
                marker=".",
                linestyle="--",
                color=COLORS[key],
                alpha=0.6,
                label=f"{LABELS[key]} RSS",
            )
    points_all = [p for _, _, series in all_series for points in series.values() for p in points]
    field = "pss_kb" if several else "rss_kb"
    top = max(p[field] / p["containers"] / 1024 for p in points_all)
    ax.set_ylim(0, top * 1.45)  # headroom for the legend above the lines
    ax.set_xscale("log")
    ticks = sorted({p["containers"] for p in points_all})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("running containers", fontsize=8)
    ax.set_ylabel("shim MB per container", fontsize=8)
    ax.set_title("shim memory per container vs count", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    return True


def _distributions(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """DISTRIBUTIONS, with the scale panel repeated for every scale series."""
    scale = [
        (name, "start_each", f"run -d, one after another (N={count})")
        for count, name, _ in _scale_series(report)
        if name != "scale"
    ]
    out: list[tuple[str, str, str]] = []
    for entry in DISTRIBUTIONS:
        out.append(entry)
        if entry[0] == "scale":
            out.extend(scale)
    return out


def plot_results(report: dict[str, Any], out: Path) -> None:
    panels = [
        (scenario, metric, title)
        for scenario, metric, title in _distributions(report)
        if (m := _metric(report, scenario, metric)) and any(m["samples"].values())
    ]
    # Sized to what will be drawn, so a file without some scenarios leaves no blank row.
    extras = [
        draw
        for draw, present in (
            (_idle_memory, _has_bars(report, "idle", IDLE_BARS)),
            (_pods_memory, _has_bars(report, "pods", POD_BARS)),
            (_scale_memory, bool(_scale_series(report))),
        )
        if present
    ]
    cols = 4
    rows = max(1, (len(panels) + len(extras) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (scenario, metric, title) in zip(flat, panels, strict=False):
        m = _metric(report, scenario, metric)
        assert m is not None
        _distribution(ax, m, title)
    used = len(panels)
    for draw in extras:
        draw(flat[used], report)
        used += 1
    for ax in flat[used:]:
        ax.remove()
    meta = report.get("meta", {})
    fig.suptitle(
        f"io.containerd.pyshim.v1 vs io.containerd.runc.v2 — {meta.get('date', '')}, "
        f"{meta.get('cpus', '?')} CPUs, {meta.get('containerd', '')}",
        fontsize=10,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    bench_dir = Path(__file__).resolve().parent
    src = Path(args[0]) if args else bench_dir / "results" / "shims.json"
    out = Path(args[1]) if len(args) > 1 else bench_dir / "shims.png"
    plot_results(json.loads(src.read_text()), out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
