"""inotify watches on what a template's forks would run, so it never forks stale code.

A fork template serves `start` requests that no longer carry a digest of the code
(shim/boot/quickstart.py: digesting ~70 files costs the requester ~1 ms, ~0.7 ms even
in a warm process). The template watches instead: the same things the digest
(shim.boot.templateclient.code_key) covers, i.e. our `.py`/`.so` files under the package
root, the `.dist-info` names in site-packages and the interpreter binary. The
kernel queues an event with the change itself, so a change made before a request
was sent is seen when that request is read. No polling: the fd sits in the
template's poll set.
"""

from __future__ import annotations

import os
import sys

from shim.boot.templateclient import CODE_EXTENSIONS, CODE_PACKAGES
from shim.boot.templateclient import site_dirs as template_site_dirs
from shim.sys.inotify import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_IGNORED,
    IN_ISDIR,
    IN_MODIFY,
    IN_MOVE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    IN_Q_OVERFLOW,
    Inotify,
)

TYPE_CHECKING = False  # typing costs ~3 ms at start-up; mypy honours this name

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

_ENTRIES = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
_SELF = IN_DELETE_SELF | IN_MOVE_SELF
CODE_MASK = _ENTRIES | _SELF | IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_ONLYDIR
SITE_MASK = _ENTRIES | _SELF | IN_ONLYDIR
FILE_MASK = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | _SELF
# Whatever says the watch itself is gone or lost events: nothing can be vouched for.
_LOST = IN_Q_OVERFLOW | IN_IGNORED | _SELF
_CODE_NAMES = tuple(ext.encode() for ext in CODE_EXTENSIONS)


def code_dirs(root: str, tops: Iterable[str]) -> Iterator[str]:
    """Every directory under root/<top> holding code (not __pycache__), parents first."""
    for top in tops:
        for dirpath, dirnames, _ in os.walk(os.path.join(root, top)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            yield dirpath


def site_dirs(paths: Iterable[str]) -> list[str]:
    """shim.boot.templateclient.site_dirs that exist (a watch needs a directory)."""
    return [p for p in template_site_dirs(paths) if os.path.isdir(p)]


class CodeWatch:
    """Once ``changed()`` says True it stays True: the watcher's owner is stale."""

    def __init__(self, code: Iterable[str], sites: Iterable[str], files: Iterable[str]) -> None:
        self._inotify = Inotify()
        self._kinds: dict[int, str] = {}
        self._stale = False
        try:
            for kind, paths, mask in (
                ("code", code, CODE_MASK),
                ("site", sites, SITE_MASK),
                ("file", files, FILE_MASK),
            ):
                for path in paths:
                    self._kinds[self._inotify.add_watch(path, mask)] = kind
        except BaseException:
            self._inotify.close()
            raise

    def fileno(self) -> int:
        return self._inotify.fd

    def changed(self) -> bool:
        """Read what is queued (never blocks); whether any of it touched the code."""
        while not self._stale:
            events = self._inotify.read_events()
            if not events:
                break
            self._stale = any(self._relevant(*event) for event in events)
        return self._stale

    def _relevant(self, wd: int, mask: int, name: bytes) -> bool:
        if mask & _LOST:
            return True
        kind = self._kinds.get(wd)
        if kind == "file":
            return True
        if kind == "site":
            return name.endswith(b".dist-info")
        if kind == "code":
            if mask & IN_ISDIR:
                return name != b"__pycache__"  # a package appeared, went or moved
            return name.endswith(_CODE_NAMES)
        return False

    def close(self) -> None:
        self._inotify.close()


def watch_code(root: str) -> CodeWatch | None:
    """A watch on everything shim.boot.templateclient.code_key digests; None where inotify fails
    (no kernel support, out of instances or watches): the caller then cannot vouch."""
    try:
        return CodeWatch(
            code_dirs(root, CODE_PACKAGES),
            site_dirs(sys.path),
            [os.path.realpath(sys.executable)],
        )
    except OSError:
        return None
