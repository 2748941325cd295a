"""The manager path beside containerd's, through the same shim binary:

    ctr run --rm --runtime io.containerd.pyshim.v1 IMAGE ID true
    pyshim run --rm --network none IMAGE -- true
    pyshim run --rm IMAGE -- true            (the default bridge network: + CNI ADD/DEL)
    pyshim ps

Rounds interleave the variants (drift hits all alike); medians and p90 in ms, and
each variant's ratio to `ctr run --rm`. A private containerd (bench/containerd_env.py)
and a private pyshimd (own run/state dirs, own bridge and /24) are started and stopped
by PID; everything is removed afterwards, also on failure.

    sudo .venv/bin/python -m bench.manager_bench --rounds 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.containerd_env import PrivateContainerd
from crashtest.images import build_busybox_oci_archive
from tests.support.manager import Manager

IMAGE = "docker.io/library/busybox:latest"
BIN = Path(sys.executable).parent


def _timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {res.returncode}: {res.stderr.strip()}")
    return took


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.manager_bench")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", default="bench/results/manager.json")
    args = p.parse_args(argv)
    os.environ["PATH"] = f"{BIN}:{os.environ['PATH']}"
    root = Path(tempfile.mkdtemp(prefix="psmb-", dir="/tmp"))
    archive = build_busybox_oci_archive(root / "bb.tar", IMAGE)
    (root / "ctrd").mkdir()
    ctrd = PrivateContainerd(root / "ctrd", namespace=f"pyshim-mbench-{os.getpid()}")
    (root / "mgr").mkdir()
    mgr = Manager(root / "mgr")
    samples: dict[str, list[float]] = {}
    try:
        ctrd.start()
        ctrd.import_image(archive)
        mgr.start()
        mgr.ok("image", "import", str(archive))
        pyshim = str(BIN / "pyshim")
        counter = iter(range(1 << 30))
        variants: dict[str, Callable[[], float]] = {
            "ctr run --rm": lambda: _timed(
                [
                    "ctr",
                    "--address",
                    str(ctrd.address),
                    "-n",
                    ctrd.namespace,
                    "run",
                    "--rm",
                    "--runtime",
                    "io.containerd.pyshim.v1",
                    IMAGE,
                    f"b{next(counter)}",
                    "true",
                ],
                ctrd.env(),
            ),
            "pyshim run --rm --network none": lambda: _timed(
                [pyshim, "run", "--rm", "--network", "none", IMAGE, "--", "true"], mgr.env
            ),
            "pyshim run --rm (bridge)": lambda: _timed(
                [pyshim, "run", "--rm", IMAGE, "--", "true"], mgr.env
            ),
            "pyshim ps": lambda: _timed([pyshim, "ps"], mgr.env),
        }
        names = list(variants)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                samples.setdefault(name, []).append(variants[name]())
    finally:
        mgr.cleanup()
        ctrd.close()
    base = statistics.median(samples["ctr run --rm"])
    summary = {}
    print(f"{'':34} {'median ms':>10} {'p90 ms':>8} {'/ ctr':>6}")
    for name, xs in samples.items():
        med = statistics.median(xs)
        p90 = sorted(xs)[max(0, int(len(xs) * 0.9) - 1)]
        summary[name] = {"median_ms": med * 1e3, "p90_ms": p90 * 1e3, "ratio": med / base}
        print(f"{name:34} {med * 1e3:10.1f} {p90 * 1e3:8.1f} {med / base:6.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "rounds": args.rounds,
                "load": os.getloadavg(),
                "summary": summary,
                "samples": samples,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
