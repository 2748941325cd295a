"""shim.daemon.rehearse: what a spare runs while idle must leave nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

# A fresh interpreter: libuv's process-wide state must not already exist (pytest's
# own process may have run event loops), so the one pipe it opens is seen.
PROBE = textwrap.dedent(
    """
    import asyncio, json, logging, os, signal, sys, threading

    def fds():
        out = {}
        for fd in sorted(int(n) for n in os.listdir("/proc/self/fd")):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
                cloexec = not os.get_inheritable(fd)
            except OSError:
                continue  # the listdir's own fd
            out[str(fd)] = [target, cloexec]
        return out

    def state():
        return {
            "handlers": {
                str(int(s)): repr(signal.getsignal(s))
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE)
            },
            "wakeup_fd": signal.set_wakeup_fd(-1),
            "threads": threading.active_count(),
            "root_handlers": len(logging.getLogger().handlers),
            "root_level": logging.getLogger().level,
            "running_loop": asyncio._get_running_loop() is not None,
            "live_tasks": len(asyncio.tasks._all_tasks),
        }

    from shim import daemon

    before_fds, before = fds(), state()
    daemon.rehearse()
    after_fds, after = fds(), state()
    new = {fd: v for fd, v in after_fds.items() if fd not in before_fds}
    gone = [fd for fd in before_fds if fd not in after_fds]
    print(json.dumps({"before": before, "after": after, "new": new, "gone": gone}))
    """
)


def test_rehearse_leaves_nothing_but_libuvs_signal_pipe() -> None:
    res = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    # Nothing logged (a spare's stderr is the template's) and no warnings.
    assert res.stderr == ""
    out = json.loads(res.stdout)
    assert out["after"] == out["before"]
    assert out["gone"] == []
    new = list(out["new"].values())
    # libuv's signal lock pipe, opened with the first loop and kept for the process.
    assert len(new) == 2, out["new"]
    assert new[0] == new[1]
    target, cloexec = new[0]
    assert target.startswith("pipe:[") and cloexec
