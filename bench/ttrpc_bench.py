"""ttrpc round-trip benchmark: our Python ttrpc against Debian's Go ttrpc.

    python -m bench.ttrpc_bench --calls 5000 [--concurrency 16] [--payload 16]

Measures small unary ``Echo`` calls for four client -> server pairs in one run
(Python -> Python, Go -> Go, Python -> Go, Go -> Python): per-call latency of
sequential calls (median, p99) and throughput with ``--concurrency`` calls in flight on
one connection. Every server runs in its own process, like a shim and containerd.
Results: a table on stdout (ratios against Go -> Go) and bench/results/ttrpc.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from google.protobuf import wrappers_pb2

RESULTS = Path(__file__).resolve().parent / "results" / "ttrpc.json"
PAIRS = (("go", "go"), ("python", "python"), ("python", "go"), ("go", "python"))


def use_uvloop(enabled: bool) -> str:
    if enabled:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    return "asyncio"


# ---------------------------------------------------------------- Python server process


async def serve_python(socket_path: str) -> None:
    from protocol.ttrpc.server import Server
    from tests.support.ttrpcpeer import SERVICE, EchoService

    server = Server()
    server.register(SERVICE, EchoService().methods())
    await server.serve_path(socket_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", flush=True)
    await stop.wait()
    server.close()


@contextmanager
def server_process(kind: str, socket_path: Path, go_binary: Path, loop: str) -> Iterator[None]:
    if kind == "go":
        argv = [str(go_binary), "server", "-socket", str(socket_path)]
    else:
        argv = [sys.executable, "-m", "bench.ttrpc_bench", "--serve", str(socket_path)]
        if loop != "uvloop":
            argv.append("--no-uvloop")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "READY":
            raise RuntimeError(f"{kind} server did not start")
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- clients


def percentile(sorted_values: list[float], pct: int) -> float:
    return sorted_values[min(len(sorted_values) - 1, (len(sorted_values) * pct) // 100)]


async def python_client(
    socket_path: Path, calls: int, concurrency: int, size: int
) -> dict[str, Any]:
    from protocol.ttrpc.client import Client
    from tests.support.ttrpcpeer import SERVICE

    request = wrappers_pb2.BytesValue(value=bytes(size))
    async with await Client.connect(str(socket_path), timeout=10) as client:

        async def call() -> None:
            await client.call(SERVICE, "Echo", request, wrappers_pb2.BytesValue)

        for _ in range(calls // 10 + 1):
            await call()
        latencies: list[float] = []
        for _ in range(calls):
            t = time.perf_counter_ns()
            await call()
            latencies.append((time.perf_counter_ns() - t) / 1000)
        latencies.sort()

        remaining = calls

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await call()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {
        "calls": calls,
        "concurrency": concurrency,
        "median_us": latencies[len(latencies) // 2],
        "p99_us": percentile(latencies, 99),
        "throughput_cps": calls / elapsed,
    }


def go_client(
    go_binary: Path, socket_path: Path, calls: int, concurrency: int, size: int
) -> dict[str, Any]:
    out = subprocess.run(
        [
            str(go_binary),
            "bench",
            "-socket",
            str(socket_path),
            "-calls",
            str(calls),
            "-concurrency",
            str(concurrency),
            "-payload",
            str(size),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------- driver


def run(calls: int, concurrency: int, size: int, loop: str) -> dict[str, Any]:
    from tests.support.ttrpcpeer import build_go_peer

    with tempfile.TemporaryDirectory(prefix="pyshim-ttrpc-bench-") as tmp:
        work = Path(tmp)
        go_binary = build_go_peer(work)
        rows: list[dict[str, Any]] = []
        for client_kind, server_kind in PAIRS:
            sock = work / f"{client_kind}-{server_kind}.sock"
            with server_process(server_kind, sock, go_binary, loop):
                if client_kind == "go":
                    stats = go_client(go_binary, sock, calls, concurrency, size)
                else:
                    stats = asyncio.run(
                        asyncio.wait_for(python_client(sock, calls, concurrency, size), 600)
                    )
            rows.append({"client": client_kind, "server": server_kind, **stats})
    base = rows[0]
    for row in rows:
        row["median_vs_go"] = row["median_us"] / base["median_us"]
        row["p99_vs_go"] = row["p99_us"] / base["p99_us"]
        row["throughput_vs_go"] = row["throughput_cps"] / base["throughput_cps"]
    return {
        "benchmark": "ttrpc unary Echo round trip",
        "calls": calls,
        "concurrency": concurrency,
        "payload_bytes": size,
        "python_loop": loop,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": rows,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{'client -> server':<18} {'median µs':>10} {'p99 µs':>10} {'calls/s':>10}"
        f" {'median x':>8} {'p99 x':>8} {'tput x':>8}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['client'] + ' -> ' + r['server']:<18} {r['median_us']:>10.1f}"
            f" {r['p99_us']:>10.1f} {r['throughput_cps']:>10.0f}"
            f" {r['median_vs_go']:>8.2f} {r['p99_vs_go']:>8.2f} {r['throughput_vs_go']:>8.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ttrpc_bench", description=__doc__)
    parser.add_argument("--calls", type=int, default=5000, help="calls per phase per pair")
    parser.add_argument("--concurrency", type=int, default=16, help="in flight, throughput phase")
    parser.add_argument("--payload", type=int, default=16, help="Echo payload bytes")
    parser.add_argument("--no-uvloop", action="store_true", help="plain asyncio loop for Python")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    loop = use_uvloop(not opts.no_uvloop)
    if opts.serve:
        asyncio.run(serve_python(opts.serve))
        return 0
    if opts.calls < 1 or opts.concurrency < 1:
        parser.error("--calls and --concurrency must be >= 1")
    report = run(opts.calls, opts.concurrency, opts.payload, loop)
    print(table(report))
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {opts.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
