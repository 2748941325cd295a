"""``python -m tests.crash``: run the harness, print the report, exit 1 on violations."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.crash.drivers import DRIVERS, Driver, SetupError
from tests.crash.plan import generate
from tests.crash.runner import Report, Runner


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.crash", description=__doc__)
    p.add_argument("--driver", choices=sorted(DRIVERS), default="manager")
    p.add_argument(
        "--runtime",
        default="io.containerd.pyshim.v1",
        help="containerd runtime name (e.g. io.containerd.runc.v2 to compare)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--ops", type=int, default=60, help="workload operations (deletes at the end extra)"
    )
    p.add_argument("--faults", type=int, default=12, help="operations that carry a fault")
    p.add_argument("--tmpfs-size", default="32m", help="size of the tmpfs holding the bundles")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="log every step")
    return p


def run(
    driver: str,
    runtime: str,
    seed: int,
    ops: int,
    faults: int,
    *,
    tmpfs_size: str = "32m",
    verbose: bool = False,
) -> Report:
    """Build the environment, run the plan, tear everything down (even on failure)."""
    plan = generate(seed, ops, faults)
    d = DRIVERS[driver](runtime, tmpfs_size)
    try:
        log = (lambda m: print(f"{time.strftime('%H:%M:%S')} {m}", flush=True)) if verbose else None
        report = Runner(d, plan, log=log).run()
        if report.violations:
            report.evidence = keep_evidence(d, report)
        return report
    finally:
        d.close()


EVIDENCE_LINES = 40


def keep_evidence(d: Driver, report: Report) -> list[str]:
    """Copy the daemon's log and records out of the run's temp dir (which close()
    removes), and quote the log lines naming the containers the violations are about."""
    kept = Path(tempfile.mkdtemp(prefix=f"pyshim-crash-{report.seed}-", dir="/tmp"))
    names = {v.detail.split()[0].rstrip(":") for v in report.violations if v.detail}
    ids = {d.ids.get(n, n) for n in names} | names
    lines = [f"daemon log and records kept in {kept}"]
    for path in d.evidence_files():
        try:
            if path.is_dir():
                shutil.copytree(path, kept / path.name, symlinks=True)
            else:
                shutil.copy(path, kept / path.name)
                text = path.read_text(errors="replace").splitlines()
                quoted = [t for t in text if any(i and i in t for i in ids)][-EVIDENCE_LINES:]
                lines += [f"{path.name}: {t[:300]}" for t in quoted]
        except OSError as exc:
            lines.append(f"{path}: not kept ({exc})")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run:
        print(generate(args.seed, args.ops, args.faults).dump())
        return 0
    if os.geteuid() != 0:
        print("the crash harness needs root (mounts, runc, containerd)", file=sys.stderr)
        return 2
    try:
        report = run(
            args.driver,
            args.runtime,
            args.seed,
            args.ops,
            args.faults,
            tmpfs_size=args.tmpfs_size,
            verbose=args.verbose,
        )
    except SetupError as exc:
        print(f"setup failed: {exc}", file=sys.stderr)
        return 2
    print(report.render(verbose=args.verbose))
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
