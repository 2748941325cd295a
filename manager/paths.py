"""Where pyshimd keeps things: one object computed from flags/env, shared by daemon and CLI."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

DEFAULT_RUN_DIR = "/run/pyshim"
DEFAULT_STATE_DIR = "/var/lib/pyshim"
RUN_DIR_ENV = "PYSHIM_RUN_DIR"
STATE_DIR_ENV = "PYSHIM_STATE_DIR"
# The shim namespace every manager-run container lives in (shim -namespace, runc root dir).
NAMESPACE = "pyshim"
SOCKET_NAME = "pyshimd.sock"


def resolve_dirs(
    run_dir: str | None = None,
    state_dir: str | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[str, str]:
    """Flag beats environment beats default (as given: maybe relative)."""
    env = os.environ if env is None else env
    run = run_dir or env.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR
    state = state_dir or env.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
    return run, state


def socket_path(run_dir: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """``Paths.resolve(run_dir).socket`` without pathlib: pathlib (with urllib.parse and
    ipaddress, which it imports) is ~8 % of a `pyshim run`'s own CPU."""
    run, _ = resolve_dirs(run_dir, None, env)
    return os.path.join(os.path.abspath(run), SOCKET_NAME)


# A NamedTuple, not a dataclass: the CLI imports this, and dataclasses brings inspect
# (~5 ms of every `pyshim` command).
class Paths(NamedTuple):
    run_dir: Path
    state_dir: Path

    @classmethod
    def resolve(
        cls,
        run_dir: str | None = None,
        state_dir: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Paths:
        """Flag beats environment beats default (resolve_dirs), made absolute."""
        from pathlib import Path  # here: the CLI's quick commands need only socket_path

        run, state = resolve_dirs(run_dir, state_dir, env)
        return cls(Path(run).absolute(), Path(state).absolute())

    @property
    def socket(self) -> Path:
        return self.run_dir / SOCKET_NAME

    @property
    def events_socket(self) -> Path:
        return self.run_dir / "events.sock"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "pyshimd.pid"

    @property
    def runc_root(self) -> Path:
        # Our own runc root keeps manager containers apart from containerd's.
        return self.run_dir / "runc"

    def bundle(self, container_id: str) -> Path:
        return self.run_dir / "bundles" / NAMESPACE / container_id

    def netns(self, container_id: str) -> Path:
        return self.run_dir / "netns" / container_id

    def fifo_dir(self, container_id: str) -> Path:
        return self.run_dir / "fifo" / container_id

    @property
    def containers_dir(self) -> Path:
        return self.state_dir / "containers"

    def container_dir(self, container_id: str) -> Path:
        return self.containers_dir / container_id

    def record(self, container_id: str) -> Path:
        return self.container_dir(container_id) / "record.json"

    def bundle_source(self, container_id: str) -> Path:
        """What the bundle (on the run dir, a tmpfs) is made of, kept to make it again
        after a reboot: the spec and the root's symlinks."""
        return self.container_dir(container_id) / "bundle.json"

    def log(self, container_id: str) -> Path:
        return self.container_dir(container_id) / "ctr.log"

    def exec_log(self, container_id: str, exec_id: str) -> Path:
        return self.container_dir(container_id) / f"exec-{exec_id}.log"

    @property
    def cni_ipam_dir(self) -> Path:
        return self.state_dir / "cni" / "ipam"

    @property
    def volumes_dir(self) -> Path:
        return self.state_dir / "volumes"

    @property
    def images_dir(self) -> Path:
        return self.state_dir / "images"
