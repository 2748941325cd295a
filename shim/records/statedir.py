"""The shim's directory in a bundle (``<bundle>/pyshim``) and making directories in it
without following anything planted there.

Imports os and stat only: the `delete` subcommand, which runs once per container,
finds its records through this module.
"""

from __future__ import annotations

import os
import stat

__all__ = [
    "EXIT_LOG",
    "EXIT_RECORD_VERSION",
    "LEGACY_EXITS_DIR",
    "STATE_DIR_NAME",
    "UnsafePathError",
    "fsync_dir",
    "make_private_dirs",
]

STATE_DIR_NAME = "pyshim"
# The container's exit records (shim.records.state.ExitLog), and the version of their format.
EXIT_LOG = "exits.log"
EXIT_RECORD_VERSION = 1
# Where shims before that log kept a file per exit: <bundle>/pyshim/exits/<id>.json.
LEGACY_EXITS_DIR = "exits"


class UnsafePathError(OSError):
    """A state path leads through something other than a real directory."""


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dirs(directory: str | os.PathLike[str]) -> None:
    """Create ``directory`` like ``mkdir -p``, refusing symlinks inside the state dir.

    Every component from the nearest ``pyshim`` ancestor down (or just ``directory``
    when there is none) must be a real directory: a symlink planted there would send
    our root-owned writes anywhere. Components above it (the bundle path) may be
    symlinks; hosts do link /var/lib/containerd elsewhere.
    """
    parts = os.path.normpath(os.fspath(directory)).split(os.sep)
    try:
        top = len(parts) - 1 - parts[::-1].index(STATE_DIR_NAME)
    except ValueError:
        top = len(parts) - 1
    made_parents = False
    for i in range(top, len(parts)):
        current = os.sep.join(parts[: i + 1]) or os.sep
        # lstat first: on every write but the first the directories exist already.
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            if not made_parents:
                parent = os.sep.join(parts[:top])
                if parent:
                    os.makedirs(parent, mode=0o700, exist_ok=True)
                made_parents = True
            try:  # noqa: SIM105 (contextlib costs `delete` ~3 ms to import)
                os.mkdir(current, 0o700)
            except FileExistsError:
                pass
            st = os.lstat(current)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(f"refusing to write state through {current}: not a directory")
