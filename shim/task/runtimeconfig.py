"""Runtime options given as TOML: containerd's generic `runtimeoptions.v1.Options`.

containerd sends this type, not the runc one, to any runtime it does not know as
runc: CRI (1.7+) with the runtime's `options` section inline (`config_body`), and
`ctr run --runtime-config-path` with a file name (`config_path`). The keys are the
runc options' as containerd's config spells them (`SystemdCgroup`, `BinaryName`,
`ShimCgroup`, ...); the proto names (`systemd_cgroup`) are accepted too.

Standard library only, and tomllib is imported on first use: `start` reads
`ShimCgroup` from here, and it runs for every container.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs ~3 ms at start-up; mypy honours this name

if TYPE_CHECKING:
    from typing import Any

RUNTIME_OPTIONS_TYPE = "runtimeoptions.v1.Options"


def normalize(key: str) -> str:
    """`SystemdCgroup`, `systemd_cgroup` and `systemdcgroup` are one key."""
    return key.replace("_", "").lower()


def read_config(config_path: str, config_body: bytes) -> dict[str, Any]:
    """The options table by normalized key; ValueError when it cannot be read or parsed."""
    if config_body:
        try:
            text = config_body.decode()
        except UnicodeDecodeError as exc:
            raise ValueError(f"runtime options config_body: {exc}") from None
        source = "config_body"
    elif config_path:
        try:
            with open(config_path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"runtime options config_path {config_path}: {exc}") from None
        source = config_path
    else:
        return {}
    import tomllib

    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"runtime options {source}: invalid TOML: {exc}") from None
    return {normalize(k): v for k, v in table.items()}
