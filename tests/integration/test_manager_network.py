"""Container networks through CNI, driven by the real pyshim CLI and pyshimd: the bridge
network with published ports, host and none; what rm leaves behind (nothing); pyshimd
restarted mid-way.

Each test's pyshimd has its own bridge and /24 (tests/support/manager.py), traffic stays
on loopback and that bridge, and cleanup removes every rule naming them even on failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.manager import Manager, manager_session, wait_for
from tests.support.net import free_port, http_get

pytestmark = pytest.mark.integration

IMAGE = "docker.io/library/bb:net"
HTTPD = "mkdir -p /www && echo hello from $(busybox hostname) > /www/index.html && exec busybox httpd -f -p 8080 -h /www"  # noqa: E501


@pytest.fixture
def manager() -> Iterator[Manager]:
    with manager_session() as m:
        m.import_busybox(IMAGE)
        yield m


def _host_netns() -> str:
    return os.readlink("/proc/self/ns/net")


def _leftovers(m: Manager, ip: str) -> list[str]:
    # The network's masquerade rule is pyshimd's (as the bridge is), not a container's:
    # it stays while pyshimd runs (test_masquerade_rule_is_the_networks).
    found = m.network_traces(keep_masquerade=True)
    netns_dir = m.run_dir / "netns"
    if netns_dir.is_dir():
        found += [f"netns file {p}" for p in netns_dir.iterdir()]
    found += [
        f"mount {line.split()[4]}"
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if f"{netns_dir}/" in line
    ]
    found += [f"IP lease {p}" for p in (m.state_dir / "cni" / "ipam").rglob(ip)]
    return found


def test_published_port_container_ip_and_clean_rm(manager: Manager) -> None:
    port = free_port()
    chains_before = "CNI-HOSTPORT-DNAT" in _iptables_nat()
    manager.ok("run", "-d", "--name", "web", "-p", f"{port}:8080", IMAGE, "--", "sh", "-c", HTTPD)
    info = manager.inspect("web")
    ip = str(info["ip_address"])
    assert ip.startswith(manager.subnet.rsplit(".", 1)[0] + "."), info
    assert info["network"] == "bridge"
    assert info["ports"] == [
        {"host_port": port, "container_port": 8080, "protocol": "tcp", "host_ip": ""}
    ]
    # From the host through the published port on loopback (portmap's DNAT).
    wait_for(lambda: http_get(f"http://127.0.0.1:{port}/") == "hello from web\n")
    # From the host and from another container, by the container's own address.
    assert http_get(f"http://{ip}:8080/") == "hello from web\n"
    res = manager.cli(
        "run", "--rm", IMAGE, "--", "busybox", "wget", "-q", "-O", "-", f"http://{ip}:8080/"
    )
    assert (res.returncode, res.stdout) == (0, "hello from web\n"), res.stderr
    assert manager.network_traces(keep_masquerade=True), "expected CNI's rules while it runs"

    manager.ok("rm", "-f", "web")
    assert _leftovers(manager, ip) == []
    assert http_get(f"http://127.0.0.1:{port}/") is None
    # portmap's shared chains go with the last published port when pyshimd made them
    # (if another CNI user had them first, they are its own and stay).
    assert not (manager.state_dir / "cni" / "hostport-chains-created").exists()
    if not chains_before:
        assert "CNI-HOSTPORT-DNAT" not in _iptables_nat()


def _iptables_nat() -> str:
    out = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True)
    return out.stdout


def test_pyshimd_restart_loses_no_network_state(manager: Manager) -> None:
    port = free_port()
    manager.ok("run", "-d", "--name", "web", "-p", f"{port}:8080", IMAGE, "--", "sh", "-c", HTTPD)
    ip = str(manager.inspect("web")["ip_address"])
    wait_for(lambda: http_get(f"http://127.0.0.1:{port}/") == "hello from web\n")
    manager.kill(signal.SIGKILL)
    manager.start()
    assert http_get(f"http://127.0.0.1:{port}/") == "hello from web\n"
    assert manager.inspect("web")["ip_address"] == ip
    # The address stays taken: the next container gets another one.
    other = manager.ok("run", "-d", "--name", "other", IMAGE, "--", "sleep", "1000").strip()
    other_ip = str(manager.inspect(other)["ip_address"])
    assert other_ip and other_ip != ip
    # A second publish of the same host port is refused, also after the restart.
    res = manager.cli("run", "-d", "-p", f"{port}:80", IMAGE, "--", "true")
    assert res.returncode == 125 and "already" in res.stderr, res.stderr
    # A restart of the container keeps its network.
    manager.ok("restart", "-t", "1", "web")
    wait_for(lambda: http_get(f"http://127.0.0.1:{port}/") == "hello from web\n")
    assert manager.inspect("web")["ip_address"] == ip
    manager.ok("rm", "-f", "web", "other")
    assert _leftovers(manager, ip) == [] and _leftovers(manager, other_ip) == []


def test_host_and_none_networks(manager: Manager) -> None:
    res = manager.cli("run", "--rm", "--network", "host", "--", "readlink", "/proc/self/ns/net")
    assert (res.returncode, res.stdout.strip()) == (0, _host_netns()), res.stderr
    res = manager.cli("run", "--rm", "--network", "none", "--", "cat", "/proc/net/dev")
    assert res.returncode == 0, res.stderr
    names = [ln.split(":")[0].strip() for ln in res.stdout.splitlines()[2:]]
    assert names == ["lo"]
    res = manager.cli("run", "--rm", "--", "cat", "/proc/net/dev")
    names = [ln.split(":")[0].strip() for ln in res.stdout.splitlines()[2:]]
    assert sorted(names) == ["eth0", "lo"], res.stdout
    listed = json.loads(manager.ok("ps", "--all", "--json"))
    assert listed == []


def test_network_errors_are_clear(manager: Manager) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = manager.cli("run", "-d", "-p", f"{port}:80", IMAGE, "--", "true")
        assert res.returncode == 125 and "already in use" in res.stderr, res.stderr
    for args, want in (
        (["-p", "80"], "expected HOST:CONTAINER"),
        (["-p", "80:80/sctp"], "expected HOST:CONTAINER"),
        (["--network", "overlay"], "invalid choice"),
    ):
        res = manager.cli("run", *args, "--", "true")
        assert res.returncode == 2 and want in res.stderr, (args, res.stderr)
    res = manager.cli("run", "--network", "none", "-p", "1:2", "--", "true")
    assert res.returncode == 125 and "needs the bridge network" in res.stderr, res.stderr
    assert json.loads(manager.ok("ps", "--all", "--json")) == []
    assert manager.network_traces() == []


def test_udp_port(manager: Manager) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # busybox's nc has no UDP; the host view (no image) has the host's python3.
    server = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
        " s.bind(('0.0.0.0', 9000))\nwhile True: print(s.recv(100).decode(), end='', flush=True)"
    )
    manager.ok(
        "run", "-d", "--name", "udp", "-p", f"{port}:9000/udp", "--", "python3", "-c", server
    )
    assert manager.inspect("udp")["ports"] == [
        {"host_port": port, "container_port": 9000, "protocol": "udp", "host_ip": ""}
    ]

    def delivered() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"ping over udp\n", ("127.0.0.1", port))
        return "ping over udp" in manager.ok("logs", "udp")

    wait_for(delivered)
    ip = str(manager.inspect("udp")["ip_address"])
    manager.ok("rm", "-f", "udp")
    assert _leftovers(manager, ip) == []


def _cni_dir(m: Manager, replace: dict[str, str]) -> Path:
    """The distribution's plugins, with some replaced by shell scripts."""
    d = m.root / "cni-bin"
    d.mkdir()
    for plugin in Path("/usr/lib/cni").iterdir():
        if plugin.name in replace:
            (d / plugin.name).write_text("#!/bin/sh\n" + replace[plugin.name])
            (d / plugin.name).chmod(0o755)
        else:
            (d / plugin.name).symlink_to(plugin)
    return d


def _restart_with(m: Manager, *flags: str) -> None:
    m.stop()
    m.extra_flags = list(flags)
    m.start()


def test_container_runs_only_once_its_network_is_up(manager: Manager) -> None:
    # The bridge ADD is made slow, so the shim start and runc create (which run while
    # ADD does) are long done when it ends: the container's first instruction must
    # still see eth0 with its address.
    cni = _cni_dir(manager, {"bridge": "sleep 1.5\nexec /usr/lib/cni/bridge\n"})
    _restart_with(manager, "--cni-path", str(cni))
    prefix = manager.subnet.rsplit(".", 1)[0] + "."
    res = manager.cli("run", "--rm", IMAGE, "--", "busybox", "ip", "-4", "-o", "addr", "show")
    assert res.returncode == 0, (res.stderr, manager.daemon_log())
    assert f"eth0    inet {prefix}" in res.stdout, res.stdout
    assert "lo    inet 127.0.0.1/8" in res.stdout, res.stdout
    assert json.loads(manager.ok("ps", "--all", "--json")) == []


FAILING_PLUGIN = (
    "cat >/dev/null\n"
    'echo \'{"cniVersion": "1.0.0", "code": 999, "msg": "refused by the test"}\'\n'
    "exit 1\n"
)


@pytest.mark.parametrize(
    "failing",
    [
        # Fails at once, while the shim is still starting and runc creating.
        "bridge",
        # Fails after bridge ADD made the veth and host-local gave out an address.
        "portmap",
    ],
)
def test_failed_cni_add_leaves_nothing_and_never_starts_the_process(
    manager: Manager, failing: str
) -> None:
    cni = _cni_dir(manager, {failing: FAILING_PLUGIN})
    _restart_with(manager, "--cni-path", str(cni))
    out = manager.root / "out"
    out.mkdir()
    res = manager.cli(
        "run",
        "--rm",
        "-p",
        f"{free_port()}:80",
        "-v",
        f"{out}:/out",
        IMAGE,
        "--",
        "touch",
        "/out/ran",
    )
    assert res.returncode == 125 and f"CNI {failing} ADD: refused by the test" in res.stderr, (
        res.stderr
    )
    assert not (out / "ran").exists(), "the container's process ran without its network"
    assert json.loads(manager.ok("ps", "--all", "--json")) == []
    assert manager.shim_processes() == []
    assert list((manager.state_dir / "containers").iterdir()) == []
    bundles = manager.run_dir / "bundles"
    assert not bundles.exists() or not any(bundles.rglob("config.json"))
    leases = [
        p.name
        for p in (manager.state_dir / "cni" / "ipam").rglob("*")
        if p.is_file() and p.name[0].isdigit()
    ]
    assert leases == []
    assert _leftovers(manager, "no-ip") == []
    veths = subprocess.run(
        ["ip", "-o", "link", "show", "master", manager.bridge], capture_output=True, text=True
    )
    assert veths.stdout.strip() == "", veths.stdout
    # The network works again as soon as the plugin does.
    _restart_with(manager)
    res = manager.cli("run", "--rm", IMAGE, "--", "true")
    assert res.returncode == 0, res.stderr


def test_masquerade_rule_is_the_networks(manager: Manager) -> None:
    """One masquerade rule for the subnet, made with the first container on the bridge,
    kept while pyshimd runs, gone when pyshimd stops with no container on the bridge."""
    assert manager.network_traces() == []
    manager.ok("run", "--rm", IMAGE, "--", "true")
    manager.ok("run", "--rm", IMAGE, "--", "true")
    rules = manager.network_traces()
    assert len(rules) == 1 and "-j MASQUERADE" in rules[0], rules
    assert f"-s {manager.subnet} ! -o {manager.bridge}" in rules[0], rules
    manager.ok("run", "-d", "--name", "stay", IMAGE, "--", "sleep", "1000")
    manager.stop()  # a container on the bridge outlives pyshimd: the rule stays
    assert len(manager.network_traces()) == 1
    manager.start()
    manager.ok("rm", "-f", "stay")
    manager.stop()
    assert manager.network_traces() == []
