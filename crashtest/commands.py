"""Client commands (ctr / pyshim) that a fault can kill mid-call."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from crashtest import procs

DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    rc: int
    out: str
    err: str
    killed: bool = False  # by a client-kill fault
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.killed and not self.timed_out

    def brief(self) -> str:
        what = "timed out" if self.timed_out else "killed" if self.killed else f"rc={self.rc}"
        tail = (self.err or self.out).strip().splitlines()[-1:] or [""]
        return f"{' '.join(self.argv[-4:])}: {what} {tail[0][:200]}"


class Commands:
    """Runs one client at a time and lets a fault thread kill the current one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: subprocess.Popen[bytes] | None = None
        self._kill_requested = False
        self.count = 0

    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str], timeout: float = DEFAULT_TIMEOUT
    ) -> Result:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
        )
        self.count += 1
        with self._lock:
            self._current = proc
            killed = self._kill_requested
            self._kill_requested = False
        if killed:
            procs.stop_process(proc)
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            procs.stop_process(proc)
            out, err = proc.communicate()
        finally:
            with self._lock:
                self._current = None
                if self._kill_requested:
                    killed = True
                    self._kill_requested = False
        killed = killed or (proc.returncode == -9 and not timed_out)
        return Result(
            tuple(argv),
            proc.returncode,
            out.decode(errors="replace"),
            err.decode(errors="replace"),
            killed=killed,
            timed_out=timed_out,
        )

    def kill_current(self) -> bool:
        """SIGKILL the client running now; if none is, the next one dies as it starts."""
        with self._lock:
            proc = self._current
            if proc is None:
                self._kill_requested = True
                return False
        procs.kill_pid(proc.pid)
        return True

    def cancel_pending_kill(self) -> None:
        with self._lock:
            self._kill_requested = False
