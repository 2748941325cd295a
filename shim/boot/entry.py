"""The binary as pip's console-script wrapper runs it (an install without
scripts/install.sh's launcher): the launcher's two steps, `start` offered to the
fork template first (shim.boot.quickstart), then shim.boot.cli.

The launcher (shim.boot.launcher) writes the same two steps into the binary itself,
which saves this module's import on every start; pip's wrapper imports site first
(~20 ms) either way.
"""

from shim.boot.quickstart import run as quick_start


def main() -> None:
    quick_start()  # returns unless the fork template ran a `start`
    from shim.boot.cli import run

    run()
