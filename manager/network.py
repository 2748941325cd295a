"""Container networks through CNI: a network namespace per container, the distribution's
CNI plugins (bridge + host-local IPAM, + portmap when ports are published) run the way a
CNI runtime runs them.

A container's namespace is a bind-mounted nsfs file under the run dir, so it outlives
pyshimd; the config and the ADD result are kept in the container's record, so DEL after
a pyshimd restart (or a changed pyshimd configuration) undoes exactly what ADD did.

Per container, only what differs per container goes through a plugin: the namespace and
its loopback are made in-process, masquerading is one rule for the whole subnet (as
docker has one per bridge network) instead of the bridge plugin's chain of per-address
rules, and portmap runs only for a container that publishes ports. Each plugin run is a
Go binary's start (~10-40 ms here), and ipMasq alone was 6-8 iptables runs in ADD and in
DEL (bench/README.md, "Manager path").
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import json
import os
import shlex
import socket
import struct
import threading
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
MS_BIND = 4096
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
# struct ifreq: the name, then a 24-byte union of which ifr_flags is the first short.
_IFREQ_FLAGS = struct.Struct("16sH22x")
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

    def conflist(self, *, ports: bool) -> dict[str, Any]:
        """The chain for one container; portmap only when it publishes ports (with no
        mapping it has nothing to add, and its DEL still searches iptables)."""
        plugins: list[dict[str, Any]] = [
            {
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": True,
                # Masquerading is the network's one rule (ensure_masquerade), not a
                # chain per container address.
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": self.subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": self.ipam_dir,
                },
            }
        ]
        if ports:
            plugins.append(
                {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}
            )
        return {
            "cniVersion": CNI_VERSION,
            # Also the name in every iptables comment the plugins write.
            "name": self.bridge,
            # Ours, not CNI's: where the plugins are, kept with the config in records.
            "cniPath": self.cni_path,
            "plugins": plugins,
        }

    @property
    def masquerade_rule(self) -> list[str]:
        """POSTROUTING's rule for the whole subnet: what leaves by another interface
        than the bridge goes out with the host's address (docker's rule per network)."""
        return [
            *("POSTROUTING", "-s", self.subnet, "!", "-o", self.bridge),
            *("-m", "comment", "--comment", f"pyshim {self.bridge} masquerade"),
            *("-j", "MASQUERADE"),
        ]


# ---------------------------------------------------------------------- namespaces


def _libc_call(name: str, *args: object) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        raise OSError(ctypes.get_errno(), f"{name}: {os.strerror(ctypes.get_errno())}")


def _loopback_up() -> None:
    """``lo`` up in the calling thread's network namespace (the loopback plugin's job:
    the kernel then gives it 127.0.0.1 and ::1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        got = fcntl.ioctl(s, SIOCGIFFLAGS, _IFREQ_FLAGS.pack(b"lo", 0))
        flags = _IFREQ_FLAGS.unpack(got)[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, _IFREQ_FLAGS.pack(b"lo", flags | IFF_UP))


def _new_netns_thread(path: Path, failure: list[BaseException]) -> None:
    # unshare(CLONE_NEWNET) moves only this thread, which ends right after: the
    # namespace lives on through the bind mount, the daemon's other threads never left.
    try:
        _libc_call("unshare", CLONE_NEWNET)
        _libc_call("mount", b"/proc/thread-self/ns/net", os.fsencode(path), None, MS_BIND, None)
        _loopback_up()
    except BaseException as exc:
        failure.append(exc)


def create_netns(path: Path) -> None:
    """A new network namespace with ``lo`` up, kept alive by a bind mount on ``path``;
    made in a thread of our own (~0.3 ms) rather than by `unshare` and the loopback
    plugin (two process starts, ~15-45 ms here)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.touch(mode=0o600)
    failure: list[BaseException] = []
    worker = threading.Thread(target=_new_netns_thread, args=(path, failure), name="netns")
    worker.start()
    worker.join()
    if failure:
        with contextlib.suppress(NetworkError):
            remove_netns(path)
        raise NetworkError(f"creating network namespace {path}: {failure[0]}")


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
    """The chain's ADD in order, each given the result so far (``lo`` is up already:
    create_netns)."""
    cni_path = conflist.get("cniPath", DEFAULT_CNI_PATH)
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


# ---------------------------------------------------------------------- masquerade


async def ensure_masquerade(network: BridgeNetwork) -> bool:
    """The network's masquerade rule, added unless it is there; whether it was added."""
    code, _ = await _iptables("-t", "nat", "-C", *network.masquerade_rule)
    if code == 0:
        return False
    code, out = await _iptables("-t", "nat", "-A", *network.masquerade_rule)
    if code != 0:
        raise NetworkError(f"adding the masquerade rule for {network.subnet}: {out.strip()}")
    return True


async def remove_masquerade(network: BridgeNetwork) -> None:
    code, out = await _iptables("-t", "nat", "-D", *network.masquerade_rule)
    if code != 0 and "does a matching rule exist" not in out and "No chain" not in out:
        raise NetworkError(f"removing the masquerade rule for {network.subnet}: {out.strip()}")


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
