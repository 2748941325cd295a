"""Run containers through pyshim, the two ways it is used, on this machine.

1. pyshimd + the pyshim CLI (no containerd): `pyshim run -- echo …` on a
   read-only view of the host.
2. A private containerd (own root, state and sockets in a temp dir) with
   `ctr run --runtime io.containerd.pyshim.v1` on a busybox image built here.

Everything it starts it stops by PID; nothing under /run/containerd,
/var/lib/containerd, /run/pyshim or /var/lib/pyshim is used except the shim
sockets containerd 1.6 always puts in /run/containerd/s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from crashtest.images import build_busybox_oci_archive  # noqa: E402
from tests.support.containerd import Containerd  # noqa: E402
from tests.support.template import stop_templates  # noqa: E402

BIN = Path(sys.executable).parent
IMAGE = "docker.io/library/busybox:latest"


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def manager_demo(tmp: Path) -> None:
    env = dict(
        os.environ,
        PYSHIM_RUN_DIR=str(tmp / "run"),
        PYSHIM_STATE_DIR=str(tmp / "state"),
        PYSHIM_TEMPLATE_DIR=str(tmp / "template"),
    )
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    _say("pyshimd + pyshim run -- echo (host's /usr, /bin, /lib read-only)")
    daemon = subprocess.Popen(
        [str(BIN / "pyshimd"), "--log-level", "warning"], env=env, stdin=subprocess.DEVNULL
    )
    try:
        sock = tmp / "run" / "pyshimd.sock"
        deadline = time.monotonic() + 20
        while not sock.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("pyshimd did not come up")
            time.sleep(0.05)
        cmd = [
            str(BIN / "pyshim"),
            "run",
            "--rm",
            "--",
            "sh",
            "-c",
            "echo hello from pyshim; exit 3",
        ]
        code = subprocess.run(cmd, env=env, check=False).returncode
        print(f"exit code: {code}")
        if code != 3:
            raise SystemExit("unexpected exit code from pyshim run")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=20)
        stop_templates(tmp / "template")


def containerd_demo(tmp: Path) -> None:
    _say("containerd 1.6 + ctr run --runtime io.containerd.pyshim.v1")
    archive = build_busybox_oci_archive(tmp / "busybox.tar", IMAGE)
    with Containerd() as ctrd:
        ctrd.ctr("images", "import", str(archive))
        out = ctrd.ctr(
            "run", "--rm", "--runtime", "io.containerd.pyshim.v1", IMAGE, "demo",
            "sh", "-c", "echo hello from pyshim under containerd; uname -a",
        )  # fmt: skip
        print(out.stdout, end="")


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("run as root: containers need it")
    with tempfile.TemporaryDirectory(prefix="pyshim-demo-") as tmp:
        manager_demo(Path(tmp))
        containerd_demo(Path(tmp))
    print("\ndemo OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
