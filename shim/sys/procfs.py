"""/proc/<pid>/stat, read one way for the shim, its `delete` and the template.

Standard library only: `delete` runs once per container and imports almost nothing.
"""

from __future__ import annotations

__all__ = ["gone", "stat_fields"]


def stat_fields(pid: int | str, proc: str = "/proc") -> list[bytes]:
    """The fields of ``<proc>/<pid>/stat`` after "pid (comm)": field N of proc(5) is
    ``[N - 3]`` (``[0]`` the state, ``[1]`` the parent pid).

    Raises ``OSError`` when it cannot be read (the pid is gone) and ``ValueError``
    when it has no "(comm)".
    """
    with open(f"{proc}/{pid}/stat", "rb") as f:
        data = f.read()
    # comm may hold spaces and ")": only what follows the last ")" has fixed fields.
    _, paren, tail = data.rpartition(b")")
    if not paren:
        raise ValueError(f"{proc}/{pid}/stat has no (comm)")
    return tail.split()


def gone(pid: int | str, proc: str = "/proc") -> bool:
    """Whether ``pid`` no longer runs: no such process, or a zombie (Z) or dead (X) one."""
    try:
        return stat_fields(pid, proc)[0] in (b"Z", b"X")
    except (OSError, IndexError, ValueError):
        return True
