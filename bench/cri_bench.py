"""Pod start latency through containerd's CRI plugin: pyshim vs the Go runc shim.

    sudo .venv/bin/python -m bench.cri_bench [--rounds 10] [--out bench/results/cri.json]

One private containerd with the CRI plugin (tests/support/cri.py: CNI bridge on a
private /24, the static pause image, busybox) has two runtime handlers: ``pyshim``
(the default, io.containerd.pyshim.v1) and ``runc`` (io.containerd.runc.v2, the Go
shim). Each round, for each handler (order alternating per round), we time what a
kubelet does to get one container running: RunPodSandbox, CreateContainer,
StartContainer until ContainerStatus says RUNNING; then the teardown (StopPodSandbox
+ RemovePodSandbox, which removes the container too). Every step is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.containerd_env import launcher_problem
from bench.stats import MetricRow, format_markdown, format_table, round_order, summarize
from crashtest.images import build_busybox_oci_archive
from protocol.proto.cri.runtime.v1 import api_pb2 as cri
from tests.support.cri import BUSYBOX_REF, CriNode, build_pause_archive

HANDLERS = {"go": "runc", "py": "pyshim"}
METRICS = ("pod_start", "run_pod_sandbox", "create_container", "start_container", "teardown")


def one_pod(node: CriNode, handler: str, index: int) -> dict[str, float]:
    c = node.client
    assert c is not None
    config = node.pod_config(f"bench-{handler}-{index}")
    container = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="sleeper"),
        image=cri.ImageSpec(image=BUSYBOX_REF),
        command=["sleep", "3600"],
        log_path="sleeper/0.log",
    )
    t0 = time.perf_counter()
    pod = c.run_pod_sandbox(config, runtime_handler=handler)
    t1 = time.perf_counter()
    cid = c.create_container(pod, container, config)
    t2 = time.perf_counter()
    c.start_container(cid)
    while c.container_status(cid).status.state != cri.CONTAINER_RUNNING:
        time.sleep(0.001)
    t3 = time.perf_counter()
    status = c.pod_sandbox_status(pod).status
    if status.state != cri.SANDBOX_READY or not status.network.ip:
        raise RuntimeError(f"pod {pod} not ready: {status}")
    t4 = time.perf_counter()
    c.stop_pod_sandbox(pod)
    c.remove_pod_sandbox(pod)
    t5 = time.perf_counter()
    if c.list_pod_sandboxes():
        raise RuntimeError("a pod survived RemovePodSandbox")
    return {
        "pod_start": (t3 - t0) * 1000,
        "run_pod_sandbox": (t1 - t0) * 1000,
        "create_container": (t2 - t1) * 1000,
        "start_container": (t3 - t2) * 1000,
        "teardown": (t5 - t4) * 1000,
    }


def run(rounds: int, warmup: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="pyshim-cri-bench-"))
    samples: dict[str, dict[str, list[float]]] = {m: {k: [] for k in HANDLERS} for m in METRICS}
    load_start = os.getloadavg()
    try:
        busybox = build_busybox_oci_archive(work / "busybox.tar", ref=BUSYBOX_REF)
        pause = build_pause_archive(work / "pause.tar")
        node = CriNode(busybox_archive=busybox, pause_archive=pause)
        try:
            for i in range(warmup):
                for key in HANDLERS:
                    one_pod(node, HANDLERS[key], -1 - i)
            for r in range(rounds):
                for key in round_order(r, list(HANDLERS)):
                    for metric, value in one_pod(node, HANDLERS[key], r).items():
                        samples[metric][key].append(value)
        finally:
            node.close()
        leftovers = node.leftovers()
        if leftovers:
            raise RuntimeError(f"cleanup left: {leftovers}")
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
        "rounds": rounds,
        "warmup": warmup,
        "samples_ms": samples,
    }


def rows(result: dict[str, Any]) -> list[MetricRow]:
    out = []
    for metric in METRICS:
        s = result["samples_ms"][metric]
        out.append(
            MetricRow(
                scenario="cri",
                metric=metric,
                unit="ms",
                go=summarize(s["go"]),
                py=summarize(s["py"]),
            )
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cri_bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=10, help="samples per runtime")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured pods per runtime")
    parser.add_argument("--out", default="bench/results/cri.json", help="raw samples (JSON)")
    opts = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (containerd, CNI, cgroups)", file=sys.stderr)
        return 2
    if problem := launcher_problem(Path(sys.executable).parent, "containerd-shim-pyshim-v1"):
        print(problem, file=sys.stderr)
        return 2
    result = run(opts.rounds, opts.warmup)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2) + "\n")
    table = rows(result)
    print(format_table(table))
    print()
    print(format_markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
