"""After a reboot: pyshimd's records survive in its state dir, everything else (shims,
containers, bundles on the run dir's tmpfs, mounts, network namespaces, the bridge and
its rules) is gone. As with docker, `always` and `unless-stopped` containers come back
when pyshimd starts, a stopped one stays stopped, and any of them can be started again
by hand, with its network, its log and its rw layer.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.manager import Manager, manager_session, wait_for
from tests.support.net import free_port, http_get

pytestmark = pytest.mark.integration

IMAGE = "docker.io/library/bb:reboot"
# Counts its runs in its rw layer.
COUNT = "echo $((0 + $(cat /n 2>/dev/null || echo 0) + 1)) > /n; cat /n; sleep 1000"
HTTPD = "echo up; mkdir -p /www && echo hello > /www/index.html && exec busybox httpd -f -p 8080 -h /www"  # noqa: E501


@pytest.fixture
def manager() -> Iterator[Manager]:
    with manager_session() as m:
        m.import_busybox(IMAGE)
        yield m


def _status(m: Manager, ref: str) -> object:
    return m.inspect(ref)["status"]


def test_containers_after_a_reboot(manager: Manager) -> None:
    port = free_port()
    manager.ok("run", "-d", "--name", "web", "--restart", "always", "-p", f"{port}:8080",
               IMAGE, "--", "sh", "-c", HTTPD)  # fmt: skip
    manager.ok("run", "-d", "--name", "plain", IMAGE, "--", "sh", "-c", COUNT)
    manager.ok("run", "-d", "--name", "keep", "--restart", "unless-stopped", "--", "sleep", "1000")
    manager.ok("stop", "-t", "0", "keep")
    wait_for(lambda: http_get(f"http://127.0.0.1:{port}/") == "hello\n")
    wait_for(lambda: manager.ok("logs", "plain") == "1\n")

    manager.power_off()
    manager.start()

    # `always` comes back, with its published port; `unless-stopped` stopped by hand and
    # a container without a policy stay stopped, their shims' end recorded.
    wait_for(lambda: _status(manager, "web") == "running", timeout=60)
    wait_for(lambda: http_get(f"http://127.0.0.1:{port}/") == "hello\n")
    assert manager.ok("logs", "web") == "up\nup\n"
    assert _status(manager, "keep") == "stopped"
    assert _status(manager, "plain") == "stopped"

    # Started by hand: the same container, its rw layer and log kept.
    manager.ok("start", "plain")
    wait_for(lambda: manager.ok("logs", "plain") == "1\n2\n")
    manager.ok("start", "keep")
    assert _status(manager, "keep") == "running"
    ip = str(manager.inspect("web")["ip_address"])
    res = manager.cli("exec", "plain", "--", "busybox", "wget", "-q", "-O", "-",
                      f"http://{ip}:8080/")  # fmt: skip
    assert (res.returncode, res.stdout) == (0, "hello\n"), res.stderr
    manager.ok("rm", "-f", "web", "plain", "keep")
    # Nothing of either network (before and after the reboot) is left.
    assert manager.network_traces(keep_masquerade=True) == []
    leases = [p.name for p in (manager.state_dir / "cni" / "ipam").rglob("*.*.*.*")]
    assert leases == []


def test_a_bundle_that_cannot_be_made_again_is_a_clear_error(manager: Manager) -> None:
    cid = manager.ok("run", "-d", "--name", "lost", "--restart", "always", "--", "sleep",
                     "1000").strip()  # fmt: skip
    (manager.state_dir / "containers" / cid / "bundle.json").unlink()
    manager.power_off()
    manager.start()
    # The policy keeps trying with back-off, each try failing with the reason.
    wait_for(lambda: int(manager.inspect("lost")["restart_count"]) >= 3)  # type: ignore[call-overload]
    assert _status(manager, "lost") == "restarting"
    assert "restart failed: its bundle is gone and cannot be made again" in manager.daemon_log()
    res = manager.cli("start", "lost")
    assert res.returncode == 125
    assert "cannot start lost: its bundle is gone and cannot be made again" in res.stderr
    manager.ok("rm", "-f", "lost")
