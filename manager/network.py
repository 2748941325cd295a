"""Container networks through CNI: a network namespace per container, the distribution's
CNI plugins (bridge + host-local IPAM + portmap) run the way a CNI runtime runs them.

A container's namespace is a bind-mounted nsfs file under the run dir, so it outlives
pyshimd; the config and the ADD result are kept in the container's record, so DEL after
a pyshimd restart (or a changed pyshimd configuration) undoes exactly what ADD did.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import ipaddress
import json
import os
import shlex
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CNI_VERSION = "1.0.0"
DEFAULT_CNI_PATH = "/usr/lib/cni"
DEFAULT_BRIDGE = "pyshim0"
DEFAULT_SUBNET = "10.87.0.0/16"
NETWORK_MODES = ("bridge", "host", "none")
IFNAME = "eth0"
# A plugin that has not answered by then is stuck (on a lock, on iptables).
PLUGIN_TIMEOUT = 60.0
MNT_DETACH = 2
# Linux interface names: IFNAMSIZ - 1.
MAX_IFNAME = 15


class NetworkError(Exception):
    pass


@dataclass(frozen=True)
class BridgeNetwork:
    """pyshimd's bridge network (flags --bridge, --subnet, --cni-path)."""

    bridge: str = DEFAULT_BRIDGE
    subnet: str = DEFAULT_SUBNET
    cni_path: str = DEFAULT_CNI_PATH
    ipam_dir: str = ""

    def __post_init__(self) -> None:
        if not 0 < len(self.bridge) <= MAX_IFNAME or "/" in self.bridge or " " in self.bridge:
            raise NetworkError(f"invalid bridge name {self.bridge!r}")
        try:
            ipaddress.ip_network(self.subnet)
        except ValueError as exc:
            raise NetworkError(f"invalid subnet {self.subnet!r}: {exc}") from None

    def conflist(self) -> dict[str, Any]:
        return {
            "cniVersion": CNI_VERSION,
            # Also the name in every iptables comment the plugins write.
            "name": self.bridge,
            # Ours, not CNI's: where the plugins are, kept with the config in records.
            "cniPath": self.cni_path,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    "ipMasq": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.subnet}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": self.ipam_dir,
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
            ],
        }


# ---------------------------------------------------------------------- namespaces


async def create_netns(path: Path) -> None:
    """A new network namespace, kept alive by a bind mount on ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.touch(mode=0o600)
    proc = await asyncio.create_subprocess_exec(
        "unshare",
        f"--net={path}",
        "true",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        with contextlib.suppress(OSError):
            path.unlink()
        raise NetworkError(f"creating network namespace {path}: {err.decode().strip()}")


def remove_netns(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise NetworkError(f"unmounting {path}: {os.strerror(err)}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# ---------------------------------------------------------------------- plugins


async def _plugin(
    cni_path: str,
    command: str,
    conf: dict[str, Any],
    *,
    container_id: str,
    netns: str,
    ifname: str,
) -> dict[str, Any]:
    """Run one plugin as the CNI spec says: the command in the environment, the
    network config on stdin, the result (or error) as JSON on stdout."""
    kind = conf["type"]
    binary = Path(cni_path) / kind
    if not os.access(binary, os.X_OK):
        raise NetworkError(
            f"CNI plugin {kind!r} not found in {cni_path} (Debian: containernetworking-plugins)"
        )
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": ifname,
        "CNI_PATH": cni_path,
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    }
    proc = await asyncio.create_subprocess_exec(
        str(binary),
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(json.dumps(conf).encode()), PLUGIN_TIMEOUT
        )
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise NetworkError(f"CNI {kind} {command} timed out") from None
    if proc.returncode != 0:
        msg = err.decode(errors="replace").strip()
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(out)
            msg = detail.get("msg", msg) + (
                f": {detail['details']}" if detail.get("details") else ""
            )
        raise NetworkError(f"CNI {kind} {command}: {msg or f'exit status {proc.returncode}'}")
    if not out.strip():
        return {}
    result: dict[str, Any] = json.loads(out)
    return result


def _plugin_conf(
    conflist: dict[str, Any], plugin: dict[str, Any], ports: list[dict[str, Any]]
) -> dict[str, Any]:
    conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **plugin}
    conf.pop("capabilities", None)
    if plugin.get("capabilities", {}).get("portMappings"):
        conf["runtimeConfig"] = {"portMappings": ports}
    return conf


async def add(
    conflist: dict[str, Any],
    *,
    container_id: str,
    netns: Path,
    ports: list[dict[str, Any]],
) -> dict[str, Any]:
    """lo up, then the chain's ADD in order, each given the result so far."""
    cni_path = conflist.get("cniPath", DEFAULT_CNI_PATH)
    await _plugin(
        cni_path,
        "ADD",
        {"cniVersion": CNI_VERSION, "name": "lo", "type": "loopback"},
        container_id=container_id,
        netns=str(netns),
        ifname="lo",
    )
    result: dict[str, Any] = {}
    for plugin in conflist["plugins"]:
        conf = _plugin_conf(conflist, plugin, ports)
        if result:
            conf["prevResult"] = result
        result = await _plugin(
            cni_path, "ADD", conf, container_id=container_id, netns=str(netns), ifname=IFNAME
        )
    return result


async def delete(
    conflist: dict[str, Any],
    *,
    container_id: str,
    netns: Path,
    ports: list[dict[str, Any]],
    result: dict[str, Any],
) -> None:
    """The chain's DEL in reverse, every plugin even when one fails (the first error is
    raised at the end): a leaked IP or port mapping is worse than a noisy teardown."""
    cni_path = conflist.get("cniPath", DEFAULT_CNI_PATH)
    # A namespace that is gone is given as "" (the spec allows it; plugins skip it).
    ns = str(netns) if netns.exists() else ""
    first: NetworkError | None = None
    for plugin in reversed(conflist["plugins"]):
        conf = _plugin_conf(conflist, plugin, ports)
        if result:
            conf["prevResult"] = result
        try:
            await _plugin(cni_path, "DEL", conf, container_id=container_id, netns=ns, ifname=IFNAME)
        except NetworkError as exc:
            first = first or exc
    if first is not None:
        raise first


def result_ip(result: dict[str, Any]) -> str:
    for ip in result.get("ips", []):
        address = str(ip.get("address", ""))
        if address:
            return address.split("/")[0]
    return ""


# ---------------------------------------------------------------------- host ports


def check_host_port(port: int, protocol: str, host_ip: str) -> None:
    """Refuse a host port something on this host already listens on: DNAT would
    silently take its traffic away."""
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        # TIME_WAIT leftovers are no conflict; a live listener still is.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host_ip or "0.0.0.0", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise NetworkError(
                    f"host port {port}/{protocol} is already in use on this host"
                ) from None
            raise NetworkError(f"host port {port}/{protocol}: {exc.strerror}") from None


# ---------------------------------------------------------------------- portmap's chains

HOSTPORT_CHAIN = "CNI-HOSTPORT-DNAT"
HOSTPORT_PREFIX = "CNI-HOSTPORT-"


async def _iptables(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "iptables",
        "-w",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def hostport_chains_exist() -> bool:
    code, _ = await _iptables("-t", "nat", "-S", HOSTPORT_CHAIN)
    return code == 0


async def prune_hostport_chains() -> bool:
    """Remove portmap's shared chains (and the jumps to them) once no mapping is left
    in them. Only called when pyshimd created them: another CNI user's are left alone.
    Returns whether they were removed."""
    code, rules = await _iptables("-t", "nat", "-S", HOSTPORT_CHAIN)
    if code != 0:
        return False
    if any(line.startswith("-A ") for line in rules.splitlines()):
        return False  # someone maps ports through them right now
    code, everything = await _iptables("-t", "nat", "-S")
    if code != 0:
        return False
    chains: list[str] = []
    for line in everything.splitlines():
        words = shlex.split(line)
        if words[:1] == ["-N"] and words[1].startswith(HOSTPORT_PREFIX):
            chains.append(words[1])
        elif words[:1] == ["-A"] and not words[1].startswith(HOSTPORT_PREFIX):
            target = words[words.index("-j") + 1] if "-j" in words[:-1] else ""
            if target.startswith(HOSTPORT_PREFIX):
                await _iptables("-t", "nat", "-D", *words[1:])
    for chain in chains:
        await _iptables("-t", "nat", "-F", chain)
    for chain in chains:
        await _iptables("-t", "nat", "-X", chain)
    return True
