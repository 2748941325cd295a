"""A stand-in for runc that records every command line and fakes CRIU.

Written as an executable script (``install``) that a shim is given as its runc
(runtime option ``BinaryName``). Every call is appended, as a JSON list, to
``calls.jsonl`` beside it; everything but checkpoint and restore goes to the real
runc. CRIU cannot dump on the host's kernel, so the two are faked:

- both make ``--image-path`` and ``--work-path`` as runc does (their last part only:
  a missing parent fails as in runc);
- ``checkpoint``: succeeds having written an empty ``inventory.img`` (CRIU's first
  file) into the image dir; without ``--leave-running`` it kills the container as
  CRIU's dump does (SIGKILL). When a file ``fail`` is beside the
  script, it writes ``<work>/dump.log`` (``DUMP_LOG``) and fails with the file's text.
- ``restore``: makes and starts the container from its bundle with the real runc, with
  the pid file, console socket and stdio it was given: a restore of a container that
  had just started, as far as the shim can tell.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["DUMP_LOG", "RecordingRunc", "install"]

DUMP_LOG = "fake CRIU: dump failed (the stand-in runc was told to fail)\n"

_SCRIPT = r"""#!{python}
import json, os, subprocess, sys

here = os.path.dirname(os.path.abspath(__file__))
argv = sys.argv
with open(os.path.join(here, "calls.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\n")

VALUED = {{"--root", "--log", "--log-format", "--criu"}}
i = 1
while i < len(argv) and argv[i].startswith("-"):
    i += 2 if argv[i] in VALUED else 1
globals_, command, args = argv[1:i], (argv[i] if i < len(argv) else ""), argv[i + 1:]
REAL = ["runc", *globals_]


def flag(name):
    return args[args.index(name) + 1] if name in args else None


def mkdir(path):
    # As runc makes the image and work dirs: the last part only (os.Mkdir).
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        sys.stderr.write(f"mkdir {{path}}: {{exc.strerror.lower()}}\n")
        sys.exit(1)


if command in ("checkpoint", "restore"):
    for name in ("--image-path", "--work-path"):
        if flag(name):
            mkdir(flag(name))
if command == "checkpoint":
    fail = os.path.join(here, "fail")
    if os.path.exists(fail):
        work = flag("--work-path")
        with open(os.path.join(work, "dump.log"), "w") as f:
            f.write({dump_log!r})
        sys.stderr.write(open(fail).read())
        sys.exit(1)
    # What CRIU writes first, so that the image dir looks like one.
    image = flag("--image-path")
    if image:
        open(os.path.join(image, "inventory.img"), "w").close()
    if "--leave-running" not in args:
        sys.exit(subprocess.call([*REAL, "kill", args[-1], "9"]))
    sys.exit(0)
if command == "restore":
    create = ["create", "--bundle", flag("--bundle"), "--pid-file", flag("--pid-file")]
    if flag("--console-socket"):
        create += ["--console-socket", flag("--console-socket")]
    if "--no-pivot" in args:
        create.append("--no-pivot")
    status = subprocess.call([*REAL, *create, args[-1]])
    if status == 0:
        status = subprocess.call([*REAL, "start", args[-1]])
    sys.exit(status)
os.execvp("runc", ["runc", *argv[1:]])
"""


class RecordingRunc:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / "runc"

    def calls(self) -> list[list[str]]:
        path = self.dir / "calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def commands(self, name: str) -> list[list[str]]:
        """The recorded calls of one runc command (``checkpoint``, ``restore``...)."""
        return [c for c in self.calls() if name in c[1:] and _command(c) == name]

    def fail_checkpoints(self, message: str | None) -> None:
        fail = self.dir / "fail"
        if message is None:
            fail.unlink(missing_ok=True)
        else:
            fail.write_text(message)


def _command(argv: list[str]) -> str:
    valued = {"--root", "--log", "--log-format", "--criu"}
    i = 1
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in valued else 1
    return argv[i] if i < len(argv) else ""


def install(directory: Path) -> RecordingRunc:
    directory.mkdir(parents=True, exist_ok=True)
    runc = RecordingRunc(directory)
    runc.path.write_text(_SCRIPT.format(python=sys.executable, dump_log=DUMP_LOG))
    runc.path.chmod(0o755)
    return runc
