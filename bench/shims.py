"""Side-by-side benchmarks of io.containerd.pyshim.v1 and containerd's Go shim
io.containerd.runc.v2, with one private containerd.

    .venv/bin/python -m bench --rounds 10
    .venv/bin/python -m bench --scenarios cold_run,exec --rounds 5 --runtimes go
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from bench import ksm
from bench.containerd_env import REPO, EventWatcher, PrivateContainerd, launcher_problem
from bench.scenarios import (
    FLEET_SCENARIOS,
    LATENCY_SCENARIOS,
    RUNTIMES,
    BenchConfig,
    Context,
    ScenarioFailed,
    result_names,
    run_scenario,
)
from bench.stats import format_markdown, format_table, parse_counts, rows_from_results
from crashtest.images import build_busybox_oci_archive
from tests.support.containerd2 import DEBIAN, Containerd2NotFound, locate

__all__ = ["main"]

ALL_SCENARIOS = [*LATENCY_SCENARIOS, *FLEET_SCENARIOS]
DEFAULT_OUT = REPO / "bench" / "results" / "shims.json"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"
    return (out.stdout or out.stderr).strip()


def machine_info(env: PrivateContainerd) -> dict[str, Any]:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    git = _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _version(["git", "-C", str(REPO), "status", "--porcelain", "--", "shim", "protocol"])
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_total_mb": mem_kb // 1024,
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
        "runc": _version(["runc", "--version"]).splitlines()[0],
        "containerd": _version([env.host.containerd, "--version"]),
        "go_shim": _version([env.host.go_shim, "-v"]).replace("\n", " "),
        "pyshim": _version([str(REPO / ".venv/bin/containerd-shim-pyshim-v1"), "-v"]).replace(
            "\n", " "
        ),
        "git": git + (" (shim/protocol modified)" if dirty else ""),
        "pyshim_tree": _tree_digest([REPO / "shim", REPO / "protocol"]),
        "cgroup": "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1",
        "ksm": state.settings() if (state := ksm.read_state()) else None,
        "namespace": env.namespace,
    }


def _tree_digest(roots: list[Path]) -> str:
    """Identifies the exact shim code measured, committed or not."""
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def preflight(ctx: Context) -> list[str]:
    """The runtimes that can run ``ctr run --rm IMAGE ID true`` at all."""
    usable: list[str] = []
    for key in ctx.cfg.runtimes:
        cid = ctx.new_id("preflight", key)
        try:
            ctx.env.ctr("run", "--rm", *ctx.run_args(key), ctx.cfg.image, cid, "true", timeout=60)
            usable.append(key)
        except Exception as exc:
            ctx.env.remove_container(cid)
            tail = _log_tail(ctx.env.log_path, 12)
            ctx.scenario("preflight")["errors"][key] = [str(exc)[-2000:], tail]
            _log(f"preflight: {RUNTIMES[key]} does not run a container, skipping it: {exc}")
            _log(f"containerd log tail:\n{tail}")
    return usable


def _log_tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10, help="samples per runtime, latency scenarios")
    p.add_argument(
        "--scenarios",
        default=",".join(ALL_SCENARIOS),
        help=f"comma-separated subset of: {','.join(ALL_SCENARIOS)}",
    )
    p.add_argument("--runtimes", default="go,py", help="go, py or go,py")
    p.add_argument("--idle-containers", type=int, default=5)
    p.add_argument("--idle-window", type=float, default=10.0, help="seconds")
    p.add_argument(
        "--scale",
        type=_counts,
        default=(20,),
        help="containers in the scale scenario; a comma list runs one series each (100,1000)",
    )
    p.add_argument("--pods", type=_positive, default=5, help="pods per runtime, pods scenario")
    p.add_argument("--pod-size", type=_positive, default=4, help="containers per pod")
    p.add_argument(
        "--scale-ksm",
        action="store_true",
        help="after each scale series, wait for ksmd to merge and read memory again "
        "(1000 shims: ~45 min at the kernel's default scan rate)",
    )
    p.add_argument("--restart-containers", type=int, default=5)
    p.add_argument("--restart-rounds", type=int, default=3)
    p.add_argument("--throughput-mb", type=int, default=64)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON")
    p.add_argument("--plot", type=Path, default=None, help="PNG (default: beside --out's dir)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--keep", action="store_true", help="copy containerd's log out of the temp dir")
    p.add_argument(
        "--containerd",
        choices=("1.6", "2.3"),
        default="1.6",
        help="1.6: containerd, ctr and the Go shim from PATH; 2.3: from "
        "$PYSHIM_CONTAINERD2_DIR or ../shared/containerd's tarball (unpacked in the temp dir)",
    )
    args = p.parse_args(argv)
    unknown = set(args.scenarios.split(",")) - set(ALL_SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    bad = set(args.runtimes.split(",")) - set(RUNTIMES)
    if bad:
        p.error(f"unknown runtimes: {', '.join(sorted(bad))}")
    return args


def _counts(text: str) -> tuple[int, ...]:
    try:
        return parse_counts(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive count: {text!r}")
    return int(text)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM becomes an exception so the cleanup in finally blocks runs.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        _log("bench needs root (containerd, runc, mounts)")
        return 2
    if "py" in args.runtimes.split(",") and (
        problem := launcher_problem(Path(sys.executable).parent, "containerd-shim-pyshim-v1")
    ):
        _log(problem)
        return 2
    signal.signal(signal.SIGTERM, _raise_interrupt)
    cfg = BenchConfig(
        rounds=args.rounds,
        restart_rounds=args.restart_rounds,
        idle_containers=args.idle_containers,
        idle_window_s=args.idle_window,
        scale_containers=args.scale,
        pods=args.pods,
        pod_size=args.pod_size,
        restart_containers=args.restart_containers,
        scale_ksm=args.scale_ksm,
        throughput_mb=args.throughput_mb,
        runtimes=tuple(args.runtimes.split(",")),
    )
    scenarios = [s for s in ALL_SCENARIOS if s in args.scenarios.split(",")]
    # Short path: the shim socket path and containerd's 108-byte sun_path limit.
    workdir = Path(tempfile.mkdtemp(prefix="pyshim-bench-", dir="/tmp"))
    try:
        host = DEBIAN if args.containerd == DEBIAN.name else locate(workdir / "containerd2")
    except Containerd2NotFound as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        _log(str(exc))
        return 2
    env = PrivateContainerd(workdir, namespace=f"pyshim-bench-{os.getpid()}", host=host)
    events = EventWatcher(env)
    ctx = Context(env=env, events=events, cfg=cfg)
    started = time.perf_counter()
    status = 0
    info: dict[str, Any] = {}
    try:
        env.start()
        info = machine_info(env)
        _log(f"containerd pid {env.pid}, workdir {workdir}, namespace {env.namespace}")
        _log(f"KSM (same-page merging): {info['ksm'] or 'not in this kernel'}")
        archive = workdir / "busybox.tar"
        build_busybox_oci_archive(archive, cfg.image)
        env.import_image(archive)
        events.start()
        cfg.runtimes = tuple(preflight(ctx))
        if not cfg.runtimes:
            _log("no runtime works; nothing to measure")
            status = 1
        else:
            for name in scenarios:
                _log(f"{name} ({', '.join(RUNTIMES[k] for k in cfg.runtimes)})")
                t0 = time.perf_counter()
                # The machine is shared: keep the load next to each scenario's figures.
                entries = result_names(name, cfg)
                for entry in entries:
                    ctx.scenario(entry)["loadavg_start"] = os.getloadavg()
                try:
                    run_scenario(ctx, name, _log)
                except ScenarioFailed as exc:
                    _log(f"  {name} FAILED: {exc}")
                    status = 1
                except Exception as exc:
                    for entry in entries:
                        for key in cfg.runtimes:
                            ctx.error(entry, key, f"aborted: {exc}")
                    _log(f"  {name} aborted: {exc}")
                _log(f"  {time.perf_counter() - t0:.1f} s")
    except KeyboardInterrupt:
        _log("interrupted; cleaning up")
        status = 130
    finally:
        events.stop()
        if args.keep and env.log_path.exists():
            kept = Path(f"/tmp/pyshim-bench-containerd-{os.getpid()}.log")
            shutil.copyfile(env.log_path, kept)
            _log(f"containerd log kept: {kept}")
        try:
            env.close()
        except Exception as exc:
            _log(str(exc))
            status = status or 1

    ctx.finish()
    info["loadavg_end"] = os.getloadavg()
    info["duration_s"] = round(time.perf_counter() - started, 1)
    report = {
        "meta": info,
        "config": {**cfg.__dict__, "scenarios": scenarios},
        "runtimes": RUNTIMES,
        "scenarios": ctx.results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(args.out)
    rows = rows_from_results(ctx.results)
    print(format_table(rows))
    print()
    print(format_markdown(rows))
    _print_errors(ctx.results)
    _log(f"results: {args.out}")
    if not args.no_plot:
        plot_path = args.plot or args.out.parent.parent / "shims.png"
        try:
            from bench.plot import plot_results
        except ImportError as exc:  # matplotlib is the optional `bench` extra
            _log(f"no plot ({exc}); scripts/install.sh installs the bench extra")
        else:
            plot_results(report, plot_path)
            _log(f"plot: {plot_path}")
    return status


def _print_errors(results: dict[str, Any]) -> None:
    for name, body in results.items():
        for key, messages in body.get("errors", {}).items():
            for msg in messages[:3]:
                print(f"error {name}/{key}: {msg.strip()[:300]}")
            if len(messages) > 3:
                print(f"error {name}/{key}: … {len(messages) - 3} more")


if __name__ == "__main__":
    raise SystemExit(main())
