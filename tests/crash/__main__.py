"""``python -m tests.crash``: run the harness, print the report, exit 1 on violations."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from tests.crash.drivers import DRIVERS, SetupError
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
        return Runner(d, plan, log=log).run()
    finally:
        d.close()


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
