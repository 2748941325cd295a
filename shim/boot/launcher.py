"""Write the shim's launcher: the console-script wrapper, minus ~20 ms per invocation.

containerd runs the binary twice per container (`start`, `delete`), plus once more
for every daemon that is not forked from the template. pip's wrapper starts a full
interpreter: `site`, every `.pth` file, and for an editable install the finder
(~16 ms of importlib machinery) before its entry point (`shim.boot.entry:main`: the
hand-over of `start` to the template, then `shim.boot.cli`). The launcher runs the
same two steps with `-I -S` (no site, no environment variables, no user or script
directory on sys.path) and the few directories it needs written in, as they are at
install time.

    python -m shim.boot.launcher PATH [PATH...]     # e.g. .venv/bin/containerd-shim-pyshim-v1

The same start (no site, written-in sys.path) serves any other console script of this
install whose program starts often, e.g. the `pyshim` CLI (~20 ms of its ~100 ms):

    python -m shim.boot.launcher --entry manager.cli:main .venv/bin/pyshim
"""

from __future__ import annotations

import os
import site
import sys

# The second line of every launcher this module writes; is_launcher() looks for it.
MARK = "# Written by `python -m shim.boot.launcher"

TEMPLATE = """#!{python} -IS
{mark}`; rewrite it after moving the install.
# -IS skips site (and its .pth files and editable-install finder) and ignores
# PYTHON* variables; the directories below are all the shim imports from.
import sys

sys.path.extend({paths!r})
from shim.boot.quickstart import run as quick_start

quick_start()  # returns unless the fork template ran a `start`
from shim.boot.cli import run

run()
"""


ENTRY_TEMPLATE = """#!{python} -IS
{mark} --entry {module}:{func}`; rewrite it after
# moving the install. -IS skips site (and its .pth files and editable-install finder)
# and ignores PYTHON* variables; the directories below are all it imports from.
import sys

sys.path.extend({paths!r})
from {module} import {func}

sys.exit({func}())
"""


def import_paths() -> list[str]:
    """site-packages (dependencies), then where `shim` lives if elsewhere (editable)."""
    import shim

    paths = [p for p in site.getsitepackages() if os.path.isdir(p)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(shim.__file__)))
    if root not in paths:
        paths.append(root)
    return paths


def render(
    python: str | None = None, paths: list[str] | None = None, entry: str | None = None
) -> str:
    """The shim's launcher, or with ``entry`` (``module:function``) a console script's."""
    python = python or sys.executable
    paths = import_paths() if paths is None else paths
    if entry is None:
        return TEMPLATE.format(python=python, paths=paths, mark=MARK)
    module, sep, func = entry.partition(":")
    if not sep or not module or not func.isidentifier():
        raise ValueError(f"--entry wants MODULE:FUNCTION, not {entry!r}")
    return ENTRY_TEMPLATE.format(python=python, paths=paths, module=module, func=func, mark=MARK)


def is_launcher(path: str) -> bool:
    """Whether ``path`` is a launcher this module wrote, not pip's console-script
    wrapper (which a later `pip install` of the project puts back in its place)."""
    try:
        with open(path) as f:
            head = f.read(256)
    except (OSError, UnicodeDecodeError):
        return False
    return head.startswith("#!") and f"\n{MARK}" in head


def install(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    # rename: a containerd exec'ing the binary meanwhile sees the old or the new file.
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    targets = sys.argv[1:] if argv is None else list(argv)
    entry = None
    if targets[:1] == ["--entry"] and len(targets) > 1:
        entry, targets = targets[1], targets[2:]
    if not targets:
        sys.stderr.write(
            "usage: python -m shim.boot.launcher [--entry MODULE:FUNCTION] PATH [PATH...]\n"
        )
        return 2
    try:
        text = render(entry=entry)
    except ValueError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    for target in targets:
        install(target, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
