"""Named volumes: a directory per name under the state dir, bind-mounted into containers.

``<state>/volumes/<name>/_data`` is what containers see (docker's layout, so the name's
directory can later hold metadata beside the data).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DATA = "_data"


class VolumeError(Exception):
    pass


class VolumeNotFound(VolumeError):
    pass


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    mountpoint: Path
    created_at_ns: int


class VolumeStore:
    def __init__(self, root: Path, valid_name: Callable[[str], bool]) -> None:
        self.root = root
        self._valid = valid_name

    def _check(self, name: str) -> None:
        if not self._valid(name):
            raise VolumeError(
                f"invalid volume name {name!r}: use letters, digits and single . _ - between them"
            )

    def path(self, name: str) -> Path:
        self._check(name)
        return self.root / name / DATA

    def _info(self, name: str) -> VolumeInfo:
        data = self.root / name / DATA
        return VolumeInfo(name=name, mountpoint=data, created_at_ns=data.stat().st_mtime_ns)

    def create(self, name: str) -> tuple[VolumeInfo, bool]:
        """The volume, made if missing; True when it was made now."""
        data = self.path(name)
        made = not data.is_dir()
        if made:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            (self.root / name).mkdir(exist_ok=True, mode=0o700)
            # 0755 as docker's: containers running as other users can still enter it.
            data.mkdir(exist_ok=True, mode=0o755)
        return self._info(name), made

    def get(self, name: str) -> VolumeInfo:
        if not self.path(name).is_dir():
            raise VolumeNotFound(f"no such volume: {name} (see `pyshim volume ls`)")
        return self._info(name)

    def all(self) -> list[VolumeInfo]:
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        return [self._info(n) for n in names if (self.root / n / DATA).is_dir()]

    def remove(self, name: str, used_by: list[str]) -> None:
        self.get(name)
        if used_by:
            raise VolumeError(
                f"volume {name} is in use by {', '.join(used_by)}; remove the container first"
            )
        shutil.rmtree(self.root / name)
