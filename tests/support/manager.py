"""A private pyshimd for integration tests, and the pyshim CLI run against it.

Each test gets its own run/state dirs under a temp dir and its own pyshimd, stopped by
PID; containers, shims and mounts are removed even when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from crashtest.images import build_busybox_oci_archive
from tests.support.template import stop_templates

BIN = Path(sys.executable).parent
PYSHIM = str(BIN / "pyshim")
PYSHIMD = str(BIN / "pyshimd")
CMD_TIMEOUT = 60.0


def require_tools() -> None:
    missing = [t for t in ("runc",) if shutil.which(t) is None]
    if not (BIN / "containerd-shim-pyshim-v1").exists():
        missing.append("containerd-shim-pyshim-v1")
    if os.geteuid() != 0:
        pytest.fail("manager integration tests need root")
    if missing:
        pytest.fail(f"missing for manager integration tests: {', '.join(missing)}")


class Manager:
    # How long pyshimd may take to serve (a qemu TCG guest needs far longer).
    start_timeout = 30.0

    def __init__(
        self, root: Path, extra_flags: Sequence[str] = (), log_level: str = "debug"
    ) -> None:
        self.root = root
        self.log_level = log_level
        # pyshimd flags of the test's own (e.g. --runc-binary, --cni-path).
        self.extra_flags = list(extra_flags)
        self.run_dir = root / "run"
        self.state_dir = root / "state"
        self.env = dict(os.environ)
        self.env["PYSHIM_RUN_DIR"] = str(self.run_dir)
        self.env["PYSHIM_STATE_DIR"] = str(self.state_dir)
        # Our own shim fork template, so cleanup() can stop it.
        self.template_dir = root / "template"
        self.env["PYSHIM_TEMPLATE_DIR"] = str(self.template_dir)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / "pyshimd.log"
        self.shim_pids: set[int] = set()
        # The bridge network is this test's own: its bridge, its /24, its iptables
        # comments (the CNI network is named after the bridge).
        self.bridge = f"psm{secrets.token_hex(4)}"
        self.subnet = free_subnet()
        # Registry CAs, as <certs_dir>/<host:port>/ca.crt.
        self.certs_dir = root / "certs.d"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [PYSHIMD, "--log-level", self.log_level, *self.daemon_flags()],
            env=self.env,
            stdout=log,
            stderr=log,
        )
        log.close()
        # Written once serving; a SIGKILLed predecessor leaves its socket file behind.
        pid_file = self.run_dir / "pyshimd.pid"
        deadline = time.monotonic() + self.start_timeout
        while not (pid_file.exists() and pid_file.read_text().strip() == str(self.proc.pid)):
            if self.proc.poll() is not None:
                pytest.fail(f"pyshimd exited {self.proc.returncode}:\n{self.daemon_log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"pyshimd did not start:\n{self.daemon_log()}")
            time.sleep(0.05)

    def daemon_flags(self) -> list[str]:
        return [
            *("--bridge", self.bridge, "--subnet", self.subnet),
            *("--certs-dir", str(self.certs_dir)),
            *self.extra_flags,
        ]

    def daemon_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cli(
        self, *args: str, input: bytes | None = None, timeout: float = CMD_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [PYSHIM, *args],
            env=self.env,
            input=input.decode() if input is not None else None,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self._note_shims()
        return res

    def ok(self, *args: str, input: bytes | None = None, timeout: float = CMD_TIMEOUT) -> str:
        res = self.cli(*args, input=input, timeout=timeout)
        assert res.returncode == 0, (res.returncode, res.stdout, res.stderr, self.daemon_log())
        return res.stdout

    def import_busybox(self, ref: str) -> None:
        """A busybox image named ``ref`` in this pyshimd's store, with no registry."""
        archive = build_busybox_oci_archive(self.root / "bb.tar", ref=ref)
        self.ok("image", "import", str(archive))

    def inspect(self, ref: str) -> dict[str, object]:
        out: dict[str, object] = json.loads(self.ok("inspect", ref))
        return out

    def _note_shims(self) -> None:
        """Remember every shim pid we ever saw, so cleanup can stop them by PID."""
        cdir = self.state_dir / "containers"
        if not cdir.is_dir():
            return
        for rec in cdir.glob("*/record.json"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(json.loads(rec.read_text()).get("shim_pid", 0))
                if pid:
                    self.shim_pids.add(pid)

    def cleanup(self) -> None:
        self._note_shims()
        if self.proc is None:
            with contextlib.suppress(BaseException):
                self.start()
        if self.proc is not None:
            with contextlib.suppress(Exception):
                listed = json.loads(self.cli("ps", "--all", "--json", timeout=30).stdout or "[]")
                for c in listed:
                    self.cli("rm", "-f", c["id"], timeout=30)
        self._note_shims()
        self.stop()
        self._kill_everything()
        self.remove_network_traces()
        shutil.rmtree(self.root, ignore_errors=True)

    def power_off(self) -> None:
        """What a reboot leaves: pyshimd, shims, the template and containers gone
        without any clean-up of theirs, mounts and network state (bridge, rules) gone,
        the run dir (a tmpfs) empty; the state dir as it was."""
        self._note_shims()
        if self.proc is not None:
            self.kill()
        self._kill_everything()
        self.remove_network_traces()
        shutil.rmtree(self.run_dir)

    def _kill_everything(self) -> None:
        """Templates, shims and containers killed, and every mount under root undone."""
        stop_templates(self.template_dir)
        for pid in self.shim_pids:
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"containerd-shim-pyshim" in cmdline and str(self.run_dir).encode() in cmdline:
                    os.kill(pid, signal.SIGKILL)
        runc_root = self.run_dir / "runc"
        if runc_root.is_dir():
            for ns in runc_root.iterdir():
                for cid in ns.iterdir() if ns.is_dir() else []:
                    subprocess.run(
                        ["runc", "--root", str(ns), "delete", "--force", cid.name],
                        capture_output=True,
                        timeout=30,
                        check=False,
                    )
        with contextlib.suppress(OSError):
            mounts = Path("/proc/self/mounts").read_text().splitlines()
            for line in reversed(mounts):
                target = line.split()[1]
                if target.startswith(str(self.root)):
                    subprocess.run(["umount", "-l", target], capture_output=True, check=False)

    def network_traces(self, *, keep_masquerade: bool = False) -> list[str]:
        """iptables rules (any table) that name this test's network, bridge or subnet;
        with ``keep_masquerade``, all but the network's own masquerade rule (pyshimd's
        while it runs, not a container's)."""
        out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=False)
        keys = (f'"{self.bridge}"', self.bridge, self.subnet)
        found = [ln for ln in out.stdout.splitlines() if any(k in ln for k in keys)]
        if keep_masquerade:
            own = f'"pyshim {self.bridge} masquerade"'
            found = [ln for ln in found if own not in ln]
        return found

    def shim_processes(self) -> list[int]:
        """Long-lived shims serving this pyshimd (their -address is under run_dir)."""
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
                if any(b"containerd-shim-pyshim" in a for a in argv[:2]) and any(
                    a.startswith(str(self.run_dir).encode()) for a in argv
                ):
                    found.append(int(entry.name))
        return found

    def remove_network_traces(self) -> None:
        """What CNI DEL should have removed, removed by force after a failed test: rules
        naming this network and the per-container chains they jump to; portmap's shared
        chains when this pyshimd created them and they are empty; the bridge. Without
        iptables (sid's guest image has only nft) no rule of this network can exist."""
        for table in ("nat", "filter") if shutil.which("iptables") else ():
            rules = subprocess.run(
                ["iptables", "-w", "-t", table, "-S"], capture_output=True, text=True, check=False
            ).stdout.splitlines()
            chains: list[str] = []
            for line in rules:
                if self.bridge not in line and self.subnet not in line:
                    continue
                words = shlex.split(line)
                if words[:1] != ["-A"]:
                    continue
                subprocess.run(["iptables", "-w", "-t", table, "-D", *words[1:]], check=False)
                if "-j" in words[:-1]:
                    target = words[words.index("-j") + 1]
                    if target.startswith("CNI-") and not target.startswith("CNI-HOSTPORT-"):
                        chains.append(target)
            for chain in chains:
                subprocess.run(["iptables", "-w", "-t", table, "-F", chain], check=False)
                subprocess.run(["iptables", "-w", "-t", table, "-X", chain], check=False)
        if (self.state_dir / "cni" / "hostport-chains-created").exists():
            from manager.network import prune_hostport_chains

            asyncio.run(prune_hostport_chains())
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)


@contextlib.contextmanager
def manager_session(extra_flags: Sequence[str] = ()) -> Iterator[Manager]:
    require_tools()
    # Short: the sockets under it must fit in sun_path.
    root = Path(tempfile.mkdtemp(prefix="psm-", dir="/tmp"))
    m = Manager(root, extra_flags)
    try:
        m.start()
        yield m
    finally:
        m.cleanup()


def free_subnet() -> str:
    """A /24 in 10.87.0.0/16 (pyshimd's default range) that no route uses yet."""
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True)
    for _ in range(50):
        candidate = f"10.87.{secrets.randbelow(150) + 100}."
        if candidate not in routes.stdout:
            return candidate + "0/24"
    raise RuntimeError("no free 10.87.x.0/24 subnet found")


def wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        time.sleep(0.1)
