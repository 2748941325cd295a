"""pyshim-crashtest: run a seeded plan of container operations with faults injected
against a runtime (through a containerd it starts, or one you run, or pyshimd) and
report what happened to exits, events and resources.

Exit status: 0 no violation, 1 violations, 2 bad input or the environment could not
be built.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from crashtest.containerd import (
    DEBIAN,
    ContainerdError,
    Host,
    bin_dir_in,
    binary_version,
    unpack_release,
)
from crashtest.drivers import (
    DRIVERS,
    PYSHIM_RUNTIME,
    THEIR_FAULT_KINDS,
    Driver,
    Setup,
    SetupError,
)
from crashtest.plan import FAULT_KINDS, Plan, generate
from crashtest.report import compare_text, html_page, text
from crashtest.result import Report, Violation
from crashtest.runner import Runner

PROG = "pyshim-crashtest"
COMPARE_FORMAT = "pyshim-crashtest-compare/1"
DEFAULTS = {
    "driver": "containerd",
    "runtime": PYSHIM_RUNTIME,
    "seed": 1,
    "ops": 60,
    "faults": 12,
    "fault_kinds": ",".join(FAULT_KINDS),
}
EVIDENCE_LINES = 40


class UsageError(Exception):
    """Bad input: the message says what and how to fix it (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            f"  {PROG} --runtime io.containerd.runc.v2 --seed 7 --ops 150 --faults 50\n"
            f"  {PROG} --compare io.containerd.runc.v2 io.containerd.pyshim.v1 "
            "--html report.html\n"
            f"  {PROG} --containerd containerd-2.3.4-linux-amd64.tar.xz --seed 3\n"
            f"  {PROG} --address /run/containerd/containerd.sock --runtime io.containerd.runc.v2\n"
            f"  {PROG} --replay result.json      # the same plan again\n"
            f"  {PROG} --load a.json --load b.json --html diff.html"
        ),
    )
    plan = p.add_argument_group("the plan")
    plan.add_argument("--seed", type=int, help=f"plan seed (default {DEFAULTS['seed']})")
    plan.add_argument(
        "--ops",
        type=int,
        help=f"workload operations; deletes at the end extra (default {DEFAULTS['ops']})",
    )
    plan.add_argument(
        "--faults",
        type=int,
        help=f"operations that carry a fault (default {DEFAULTS['faults']})",
    )
    plan.add_argument(
        "--fault-kinds",
        metavar="KIND,...",
        help=f"faults to draw from (default all: {DEFAULTS['fault_kinds']})",
    )
    plan.add_argument(
        "--replay",
        metavar="RESULT.json",
        help="run the plan a --json result recorded again (its seed, ops, faults, kinds, "
        "driver and runtime, unless given here)",
    )
    target = p.add_argument_group("what runs it")
    target.add_argument(
        "--driver",
        choices=sorted(DRIVERS),
        help="containerd (ctr, any runtime) or manager (pyshimd, pyshim's runtime only); "
        f"default {DEFAULTS['driver']}",
    )
    target.add_argument(
        "--runtime", help=f"containerd runtime name (default {DEFAULTS['runtime']})"
    )
    target.add_argument(
        "--compare",
        nargs=2,
        metavar=("RUNTIME_A", "RUNTIME_B"),
        help="run the same plan against two runtimes and show where they differ",
    )
    where = target.add_mutually_exclusive_group()
    where.add_argument(
        "--containerd",
        metavar="DIR|TARBALL",
        help="containerd 2.x to start: a directory holding containerd, ctr and "
        "containerd-shim-runc-v2 (or bin/ with them), or a release tarball "
        "(default: containerd and ctr from PATH)",
    )
    where.add_argument(
        "--address",
        metavar="SOCKET",
        help="use the containerd you run at SOCKET (fault kinds default to, and may only be, "
        "shim-kill, shim-stop and client-kill: yours is never killed, filled or slowed)",
    )
    target.add_argument(
        "--state",
        default="/run/containerd",
        help="with --address: its state dir, where bundles are checked for leftovers",
    )
    target.add_argument(
        "--tmpfs-size", default="32m", help="size of the tmpfs holding the bundles (32m)"
    )
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write the result as JSON ('-': stdout)")
    out.add_argument(
        "--html", metavar="FILE", help="write an HTML report with a timeline of the plan"
    )
    out.add_argument(
        "--load",
        metavar="RESULT.json",
        action="append",
        help="render recorded results instead of running (twice: side by side)",
    )
    out.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    out.add_argument("-v", "--verbose", action="store_true", help="log every step")
    return p


def _kinds(value: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in value.split(",") if k.strip())
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown or not kinds:
        raise UsageError(
            f"--fault-kinds: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(FAULT_KINDS)}"
        )
    return kinds


def _read_result(path: str) -> list[Report]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"{path}: not JSON ({exc})") from None
    try:
        if isinstance(data, dict) and data.get("format") == COMPARE_FORMAT:
            return [Report.from_json(r) for r in data["runs"]]
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return [Report.from_json(data)]
    except (ValueError, TypeError, KeyError) as exc:
        raise UsageError(f"{path}: not a {PROG} result ({exc})") from None


def _settings(args: argparse.Namespace) -> dict[str, object]:
    """The plan and target: the command line, then --replay's result, then defaults."""
    recorded: dict[str, object] = {}
    if args.replay:
        runs = _read_result(args.replay)
        r = runs[0]
        recorded = {
            "driver": r.driver,
            "runtime": r.runtime,
            "seed": r.seed,
            "ops": r.planned_ops,
            "faults": r.planned_faults,
            "fault_kinds": ",".join(r.fault_kinds or FAULT_KINDS),
        }
        if len(runs) == 2 and not args.compare and not args.runtime:
            args.compare = [runs[0].runtime, runs[1].runtime]
    out: dict[str, object] = {}
    for key, default in DEFAULTS.items():
        given = getattr(args, key)
        out[key] = given if given is not None else recorded.get(key, default)
    for key in ("ops", "faults"):
        if int(str(out[key])) < 0:
            raise UsageError(f"--{key} cannot be negative")
    return out


def locate_host(spec: str | None, cache: Path | None = None) -> Host:
    """The containerd to start: PATH's (None), a bin dir, or a release tarball."""
    if spec is None:
        if shutil.which("containerd") is None or shutil.which("ctr") is None:
            raise UsageError("containerd and ctr are not on PATH: install them or use --containerd")
        return DEBIAN
    path = Path(spec)
    if path.is_file():
        cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / PROG
        try:
            bin_dir = unpack_release(path, cache)
        except ContainerdError as exc:
            raise UsageError(f"--containerd {spec}: {exc}") from None
    elif path.is_dir():
        found = bin_dir_in(path)
        if found is None:
            raise UsageError(
                f"--containerd {spec}: no containerd, ctr and containerd-shim-runc-v2 there "
                "(nor in bin/)"
            )
        bin_dir = found
    else:
        raise UsageError(f"--containerd {spec}: no such file or directory")
    version = binary_version(bin_dir / "containerd")
    if " v1." in version or " 1." in version:
        # 1.x reads another config version: run it from PATH instead.
        raise UsageError(f"--containerd {spec}: {version!r} is 1.x; only 2.x is started from a dir")
    name = version.split()[2].lstrip("v") if len(version.split()) > 2 else "2"
    return Host(name, bin_dir)


def host_label(driver: str, setup: Setup) -> str:
    if driver == "manager":
        return "pyshimd"
    if setup.address:
        return f"containerd at {setup.address}"
    version = binary_version(Path(shutil.which(setup.host.containerd) or setup.host.containerd))
    return version.split()[2] if len(version.split()) > 2 else setup.host.name


def run(setup: Setup, driver: str, plan: Plan, *, verbose: bool = False, label: str = "") -> Report:
    """Build the environment, run the plan, tear everything down (even on failure)."""
    d = DRIVERS[driver](setup)
    try:
        missing = sorted(set(plan.kinds) - set(d.fault_kinds))
        if missing and any(s.fault and s.fault.kind in missing for s in plan.steps):
            raise SetupError(
                f"this target cannot inject {', '.join(missing)}: "
                f"use --fault-kinds {','.join(d.fault_kinds)}"
            )
        log = (lambda m: print(f"{time.strftime('%H:%M:%S')} {m}", flush=True)) if verbose else None
        report = Runner(d, plan, log=log).run()
        report.host = label
        if report.violations:
            report.evidence = keep_evidence(d, report)
        return report
    finally:
        d.close()


def keep_evidence(d: Driver, report: Report) -> list[str]:
    """Copy the daemon's log and records out of the run's temp dir (which close()
    removes), and quote, for each violation, the log lines naming its container."""
    kept = Path(tempfile.mkdtemp(prefix=f"pyshim-crash-{report.seed}-", dir="/tmp"))
    lines = [f"daemon log and records kept in {kept}"]
    texts: dict[str, list[str]] = {}
    for path in d.evidence_files():
        try:
            if path.is_dir():
                shutil.copytree(path, kept / path.name, symlinks=True)
            else:
                shutil.copy(path, kept / path.name)
                texts[path.name] = path.read_text(errors="replace").splitlines()
        except OSError as exc:
            lines.append(f"{path}: not kept ({exc})")
    for v in report.violations:
        ids = _named_in(v, d.ids)
        # As a word: "c2" is not the c2 inside a digest.
        named = re.compile("|".join(rf"(?<![\w-]){re.escape(i)}(?![\w-])" for i in ids))
        for fname, text_lines in texts.items():
            quoted = [t for t in text_lines if ids and named.search(t)][-EVIDENCE_LINES:]
            v.evidence += [f"{fname}: {t[:300]}" for t in quoted]
    return lines


# A manager container id (16 hex digits), or containerd's 64.
_CONTAINER_ID = re.compile(r"[0-9a-f]{16}|[0-9a-f]{64}")


def _named_in(v: Violation, known: Mapping[str, str]) -> set[str]:
    """The containers a violation is about, by name and id: its own, or (a leak found
    at the end of a run names no container of its own) every known name or id, and
    every word shaped like a container id, in its text."""
    if v.container:
        return {v.container, known.get(v.container, "")} - {""}
    ids = set(known.values())
    words = set(re.findall(r"[\w.-]+", v.detail))
    found = {w for w in words if w in known or w in ids or _CONTAINER_ID.fullmatch(w)}
    return (found | {known[w] for w in found if w in known}) - {""}


def _write(path: str, content: str) -> None:
    if path == "-":
        sys.stdout.write(content)
        return
    try:
        Path(path).write_text(content)
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None


def _emit(runs: list[Report], args: argparse.Namespace) -> int:
    json_to_stdout = args.json == "-"
    if len(runs) == 2:
        if not json_to_stdout:
            for r in runs:
                print(text(r, verbose=args.verbose), end="\n\n")
            print(compare_text(*runs))
        doc = json.dumps({"format": COMPARE_FORMAT, "runs": [r.to_json() for r in runs]}, indent=1)
    else:
        if not json_to_stdout:
            print(text(runs[0], verbose=args.verbose))
        doc = runs[0].dumps()
    if args.json:
        _write(args.json, doc + "\n")
    if args.html:
        _write(args.html, html_page(runs))
    return 1 if any(r.violations for r in runs) else 0


def _main(args: argparse.Namespace) -> int:
    if args.load:
        if args.replay or args.compare or args.dry_run:
            raise UsageError("--load renders recorded results: no --replay, --compare, --dry-run")
        if len(args.load) > 2:
            raise UsageError("--load: at most two results (side by side)")
        runs = [r for path in args.load for r in _read_result(path)]
        if len(runs) > 2:
            raise UsageError("--load: at most two results (side by side)")
        return _emit(runs, args)
    if args.address and args.fault_kinds is None and not args.replay:
        args.fault_kinds = ",".join(THEIR_FAULT_KINDS)
    s = _settings(args)
    driver, seed = str(s["driver"]), int(str(s["seed"]))
    kinds = _kinds(str(s["fault_kinds"]))
    if args.address and set(kinds) - set(THEIR_FAULT_KINDS):
        raise UsageError(
            f"--address: a containerd you run is never killed, filled or slowed; "
            f"--fault-kinds may name {', '.join(THEIR_FAULT_KINDS)} only"
        )
    plan = generate(seed, int(str(s["ops"])), int(str(s["faults"])), kinds)
    if args.dry_run:
        print(plan.dump())
        return 0
    runtimes = list(args.compare) if args.compare else [str(s["runtime"])]
    if args.compare and (args.runtime or driver == "manager"):
        raise UsageError("--compare names both runtimes and runs them through containerd")
    if driver == "manager" and (args.containerd or args.address):
        raise UsageError("--driver manager starts pyshimd: --containerd/--address do not apply")
    if os.geteuid() != 0:
        raise SetupError("needs root (mounts, runc, containerd)")
    host = locate_host(args.containerd) if driver == "containerd" and not args.address else DEBIAN
    runs = []
    for runtime in runtimes:
        setup = Setup(
            runtime,
            tmpfs_size=args.tmpfs_size,
            host=host,
            address=args.address or "",
            state=args.state,
        )
        runs.append(run(setup, driver, plan, verbose=args.verbose, label=host_label(driver, setup)))
    return _emit(runs, args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except SetupError as exc:
        print(f"{PROG}: setup failed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
