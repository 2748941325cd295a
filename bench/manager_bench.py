"""The manager path beside containerd's, through the same shim binary:

    ctr run --rm --runtime io.containerd.pyshim.v1 IMAGE ID true
    ctr run --rm --cni ...                   (ctr's own CNI path: bridge + host-local)
    pyshim run --rm --network none IMAGE -- true
    pyshim run --rm IMAGE -- true            (the default bridge network: + CNI ADD/DEL)
    ctr task ls
    pyshim ps                                (beside ctr task ls: a listing)

and, to show where the floor of a bridge run is, the CNI work alone from Python (no
container): a namespace, bridge + host-local ADD, DEL, the namespace removed; and one
bare plugin process (`bridge` asked for its VERSION).

Rounds interleave the variants (drift hits all alike); medians and p90 in ms, each
variant's ratio to `ctr run --rm`, and its ratio to the ctr command that does the same
where there is one (the bridge runs': `ctr run --rm --cni`, `pyshim ps`'s: `ctr task ls`);
the same for the CPU time each costs, all processes of the run counted (CpuMeter).
A private containerd (bench/containerd_env.py) and a private pyshimd (own run/state
dirs, own bridge and /24) are started and stopped by PID; everything is removed
afterwards, also on failure.

ctr reads its CNI config from /etc/cni/net.d and its plugins from /opt/cni/bin, with
no flag to move them. So the whole run is in a mount namespace of its own, where
/etc and /opt are overlays carrying a conflist equivalent to pyshimd's (its own
bridge and /24, bridge + host-local, no ipMasq: pyshimd masquerades with one rule per
network, so neither side runs iptables per container) and a link to Debian's plugins
in /usr/lib/cni; nothing of that is seen outside the run.

    sudo .venv/bin/python -m bench.manager_bench --rounds 20
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.containerd_env import PrivateContainerd, launcher_problem
from crashtest.images import build_busybox_oci_archive
from tests.support.manager import Manager, free_subnet

IMAGE = "docker.io/library/busybox:latest"
# Debian's containernetworking-plugins.
CNI_PATH = "/usr/lib/cni"
BIN = Path(sys.executable).parent
CLONE_NEWNS = 0x00020000
MS_REC = 16384
MS_SLAVE = 1 << 19
MNT_DETACH = 2
CTR = "ctr run --rm"
CTR_CNI = "ctr run --rm --cni"
PY_BRIDGE = "pyshim run --rm (bridge)"
CTR_TASK_LS = "ctr task ls"
PY_PS = "pyshim ps"
# Rows also compared with the ctr command that does the same: that row, and the key
# suffix of the ratio in the results (ratio_to_..., cpu_ratio_to_...).
COUNTERPARTS = {
    CTR_CNI: (CTR_CNI, "ctr_cni"),
    PY_BRIDGE: (CTR_CNI, "ctr_cni"),
    CTR_TASK_LS: (CTR_TASK_LS, "ctr_task_ls"),
    PY_PS: (CTR_TASK_LS, "ctr_task_ls"),
}


class CpuMeter:
    """CPU time of this process and everything it starts (containerd, pyshimd, shims,
    ctr, the CLI, runc, CNI plugins; containers run in cgroups of their own): one
    cgroup (v1 cpuacct or v2) that this process joins before it starts anything. On a
    busy machine wall time mostly measures the wait for a core; the CPU a variant
    costs does not depend on that."""

    def __init__(self) -> None:
        name = f"pyshim-mbench-{os.getpid()}"
        v1 = Path("/sys/fs/cgroup/cpuacct")
        self.dir = v1 / name if v1.is_dir() else Path("/sys/fs/cgroup") / name
        self._file = "cpuacct.usage" if v1.is_dir() else "cpu.stat"
        self.dir.mkdir()
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def ns(self) -> int:
        text = (self.dir / self._file).read_text()
        if self._file == "cpu.stat":
            usec = dict(line.split() for line in text.splitlines())["usage_usec"]
            return int(usec) * 1000
        return int(text)

    def close(self) -> None:
        (self.dir.parent / "cgroup.procs").write_text(str(os.getpid()))
        for _ in range(50):
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.1)  # a last process of the run is still exiting


def _timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {res.returncode}: {res.stderr.strip()}")
    return took


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.mount(
        source.encode(), target.encode(), fstype and fstype.encode(), flags, data and data.encode()
    )
    if rc != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")


def private_cni_dirs(root: Path, conflist: dict[str, object]) -> None:
    """This process (and all it starts) in its own mount namespace, where ctr finds
    ``conflist`` in /etc/cni/net.d and the plugins in /opt/cni/bin."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    # Nothing mounted from here on reaches the host's namespace.
    _mount("none", "/", None, MS_REC | MS_SLAVE, None)
    for lower, fill in (("/etc", _write_conflist), ("/opt", _link_plugins)):
        up = root / f"overlay{lower.replace('/', '-')}"
        (up / "upper").mkdir(parents=True)
        (up / "work").mkdir()
        fill(up / "upper", conflist)
        _mount(
            "overlay",
            lower,
            "overlay",
            0,
            f"lowerdir={lower},upperdir={up / 'upper'},workdir={up / 'work'}",
        )


def _write_conflist(upper: Path, conflist: dict[str, object]) -> None:
    (upper / "cni" / "net.d").mkdir(parents=True)
    (upper / "cni" / "net.d" / "10-bench.conflist").write_text(json.dumps(conflist))


def _link_plugins(upper: Path, _conflist: dict[str, object]) -> None:
    (upper / "cni").mkdir()
    (upper / "cni" / "bin").symlink_to(CNI_PATH)


def ctr_conflist(bridge: str, subnet: str, ipam_dir: str) -> dict[str, object]:
    """A plain CNI conflist doing per container what pyshimd's chain does for a
    container without ports: a veth on the bridge, an address from host-local."""
    return {
        "cniVersion": "1.0.0",
        "name": bridge,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": ipam_dir,
                },
            }
        ],
    }


async def _cni_alone(conf: dict[str, object], netns: Path, cid: str) -> None:
    """What a bridge run adds to a `--network none` run, without the container."""
    from manager import network as cni

    conf = {**conf, "cniPath": cni.DEFAULT_CNI_PATH}
    cni.create_netns(netns)
    try:
        result = await cni.add(conf, container_id=cid, netns=netns, ports=[])
        await cni.delete(conf, container_id=cid, netns=netns, ports=[], result=result)
    finally:
        cni.remove_netns(netns)


def _plugin_version() -> float:
    env = {"CNI_COMMAND": "VERSION", "PATH": os.environ["PATH"]}
    t0 = time.perf_counter()
    subprocess.run(
        [f"{CNI_PATH}/bridge"],
        input=b'{"cniVersion": "1.0.0"}',
        env=env,
        capture_output=True,
        check=True,
    )
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.manager_bench")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", default="bench/results/manager.json")
    p.add_argument(
        "--skip",
        default="",
        help="comma list of variants left out, by the start of their names (e.g. CNI,one)",
    )
    args = p.parse_args(argv)
    if problem := launcher_problem(BIN, "containerd-shim-pyshim-v1", "pyshim"):
        print(problem, file=sys.stderr)
        return 2
    os.environ["PATH"] = f"{BIN}:{os.environ['PATH']}"
    root = Path(tempfile.mkdtemp(prefix="psmb-", dir="/tmp"))
    ctr_bridge = f"psmc{secrets.token_hex(4)}"
    ctr_conf = ctr_conflist(ctr_bridge, free_subnet(), str(root / "ipam"))
    private_cni_dirs(root, ctr_conf)
    archive = build_busybox_oci_archive(root / "bb.tar", IMAGE)
    (root / "ctrd").mkdir()
    ctrd = PrivateContainerd(root / "ctrd", namespace=f"pyshim-mbench-{os.getpid()}")
    (root / "mgr").mkdir()
    # At containerd's level here (info): the tests' debug log, which writes every
    # forwarded event as JSON, is not part of what a run costs.
    mgr = Manager(root / "mgr", log_level="info")
    while mgr.subnet in json.dumps(ctr_conf):
        mgr.subnet = free_subnet()
    samples: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    meter = CpuMeter()
    try:
        ctrd.start()
        ctrd.import_image(archive)
        mgr.start()
        mgr.ok("image", "import", str(archive))
        pyshim = str(BIN / "pyshim")
        counter = iter(range(1 << 30))

        ctr = ["ctr", "--address", str(ctrd.address), "-n", ctrd.namespace]

        def ctr_run(*flags: str) -> float:
            argv = [*ctr, "run", "--rm", *flags, "--runtime", "io.containerd.pyshim.v1", IMAGE]
            return _timed([*argv, f"b{next(counter)}", "true"], ctrd.env())

        def cni_alone() -> float:
            n = next(counter)
            t0 = time.perf_counter()
            asyncio.run(_cni_alone(ctr_conf, root / f"ns{n}", f"alone{n}"))
            return time.perf_counter() - t0

        variants: dict[str, Callable[[], float]] = {
            CTR: ctr_run,
            CTR_CNI: lambda: ctr_run("--cni"),
            "pyshim run --rm --network none": lambda: _timed(
                [pyshim, "run", "--rm", "--network", "none", IMAGE, "--", "true"], mgr.env
            ),
            PY_BRIDGE: lambda: _timed([pyshim, "run", "--rm", IMAGE, "--", "true"], mgr.env),
            CTR_TASK_LS: lambda: _timed([*ctr, "task", "ls"], ctrd.env()),
            PY_PS: lambda: _timed([pyshim, "ps"], mgr.env),
            "CNI ADD+DEL alone (no container)": cni_alone,
            "one plugin exec (bridge VERSION)": _plugin_version,
        }
        skip = [w for w in args.skip.split(",") if w]
        names = [n for n in variants if not any(n.startswith(w) for w in skip)]
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                before = meter.ns()
                samples.setdefault(name, []).append(variants[name]())
                cpu.setdefault(name, []).append((meter.ns() - before) / 1e9)
    finally:
        mgr.cleanup()
        ctrd.close()
        subprocess.run(["ip", "link", "del", ctr_bridge], capture_output=True, check=False)
        libc = ctypes.CDLL(None, use_errno=True)
        for overlay in ("/etc", "/opt"):
            libc.umount2(overlay.encode(), MNT_DETACH)
        shutil.rmtree(root, ignore_errors=True)
        meter.close()
    base = statistics.median(samples[CTR])
    cpu_base = statistics.median(cpu[CTR])
    summary = {}
    print("/ same: to the ctr command that does the same (ctr run --rm --cni, ctr task ls)")
    print(
        f"{'':36} {'median ms':>10} {'p90 ms':>8} {'/ ctr':>6} {'/ same':>7}"
        f" {'CPU ms':>8} {'/ ctr':>6} {'/ same':>7}"
    )
    for name, xs in samples.items():
        med = statistics.median(xs)
        p90 = sorted(xs)[max(0, int(len(xs) * 0.9) - 1)]
        cpu_med = statistics.median(cpu[name])
        row: dict[str, float] = {
            "median_ms": med * 1e3,
            "p90_ms": p90 * 1e3,
            "ratio": med / base,
            "cpu_ms": cpu_med * 1e3,
            "cpu_ratio": cpu_med / cpu_base,
        }
        vs_same = cpu_vs_same = ""
        if name in COUNTERPARTS and COUNTERPARTS[name][0] in samples:
            same, key = COUNTERPARTS[name]
            same_med = statistics.median(samples[same])
            same_cpu = statistics.median(cpu[same])
            row[f"ratio_to_{key}"] = med / same_med
            row[f"cpu_ratio_to_{key}"] = cpu_med / same_cpu
            vs_same = f"{med / same_med:.2f}"
            cpu_vs_same = f"{cpu_med / same_cpu:.2f}"
        summary[name] = row
        print(
            f"{name:36} {med * 1e3:10.1f} {p90 * 1e3:8.1f} {med / base:6.2f} {vs_same:>7}"
            f" {cpu_med * 1e3:8.1f} {cpu_med / cpu_base:6.2f} {cpu_vs_same:>7}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "rounds": args.rounds,
                "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "load": os.getloadavg(),
                "summary": summary,
                "samples": samples,
                "cpu_samples": cpu,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
