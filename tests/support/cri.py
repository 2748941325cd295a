"""Playing the kubelet: containerd's CRI plugin on a private containerd, run on pyshim.

``CriNode`` owns everything a CRI test needs and removes all of it again: a
containerd with the CRI plugin (default runtime pyshim, a second handler ``runc`` =
the Go shim), a CNI bridge network on a private /24 with a unique bridge name and
its IPAM state in the temp dir, a pause image built from a tiny static C program,
and the busybox image. ``CriClient`` is a typed gRPC client for the CRI calls we use
(generic ``unary_unary`` calls: protocol/proto/generate.py has no gRPC plugin).
``ws_exec`` drives an Exec URL of the CRI streaming server over WebSocket.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from crashtest import images
from protocol.proto.cri.runtime.v1 import api_pb2 as cri
from tests.support.containerd import CGROUP_ROOT, RUNC_ROOT, Containerd
from tests.support.containerd2 import DEBIAN, Host
from tests.support.net import free_port

__all__ = [
    "BUSYBOX_REF",
    "PAUSE_REF",
    "PYSHIM_AS_RUNC",
    "CriClient",
    "CriNode",
    "LogLine",
    "build_pause_archive",
    "parse_cri_log",
    "ws_exec",
]

CRI_NAMESPACE = "k8s.io"
BUSYBOX_REF = "docker.io/library/busybox:latest"
PAUSE_REF = "pyshim.test/pause:1"
PYSHIM_RUNTIME = "io.containerd.pyshim.v1"
GO_RUNTIME = "io.containerd.runc.v2"
# containerd 2.x only: pyshim's binary (runtime_path) under the Go shim's runtime type.
# CRI's CheckpointContainer hands CheckpointOptions (CRIU's work path, where the archive
# takes stats-dump from) to the runtime named io.containerd.runc.v2 alone.
PYSHIM_AS_RUNC = "pyshim-as-runc"
PYSHIM_SHIM_BINARY = Path(sys.executable).parent / "containerd-shim-pyshim-v1"
CNI_BIN_DIR = "/usr/lib/cni"
# libcni's cache of ADD results; its location is not configurable in containerd 1.6.
CNI_RESULTS_DIR = Path("/var/lib/cni/results")

Resp = TypeVar("Resp", bound=Message)

# -- gRPC client -------------------------------------------------------------------------


class CriClient:
    """runtime.v1 RuntimeService / ImageService over containerd's gRPC socket."""

    def __init__(self, address: str, *, timeout: float = 60.0) -> None:
        self._channel = grpc.insecure_channel(f"unix://{address}")
        self.timeout = timeout
        # Everything a test created, so cleanup can check runc's root for leftovers.
        self.created_ids: set[str] = set()

    def close(self) -> None:
        self._channel.close()

    def _call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[Resp],
        timeout: float | None = None,
    ) -> Resp:
        stub = self._channel.unary_unary(
            f"/runtime.v1.{service}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        response: Resp = stub(request, timeout=timeout or self.timeout)
        return response

    def _runtime(self, method: str, request: Message, response_type: type[Resp],
                 timeout: float | None = None) -> Resp:  # fmt: skip
        return self._call("RuntimeService", method, request, response_type, timeout)

    def version(self) -> cri.VersionResponse:
        return self._runtime("Version", cri.VersionRequest(version="v1"), cri.VersionResponse)

    def status(self) -> cri.StatusResponse:
        return self._runtime("Status", cri.StatusRequest(), cri.StatusResponse)

    def run_pod_sandbox(self, config: cri.PodSandboxConfig, runtime_handler: str = "") -> str:
        resp = self._runtime(
            "RunPodSandbox",
            cri.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler),
            cri.RunPodSandboxResponse,
        )
        self.created_ids.add(resp.pod_sandbox_id)
        return resp.pod_sandbox_id

    def pod_sandbox_status(
        self, pod_id: str, verbose: bool = False
    ) -> cri.PodSandboxStatusResponse:
        return self._runtime(
            "PodSandboxStatus",
            cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose),
            cri.PodSandboxStatusResponse,
        )

    def list_pod_sandboxes(self) -> list[cri.PodSandbox]:
        resp = self._runtime(
            "ListPodSandbox", cri.ListPodSandboxRequest(), cri.ListPodSandboxResponse
        )
        return list(resp.items)

    def stop_pod_sandbox(self, pod_id: str) -> None:
        self._runtime("StopPodSandbox", cri.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                      cri.StopPodSandboxResponse)  # fmt: skip

    def remove_pod_sandbox(self, pod_id: str) -> None:
        self._runtime("RemovePodSandbox", cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                      cri.RemovePodSandboxResponse)  # fmt: skip

    def create_container(
        self, pod_id: str, config: cri.ContainerConfig, sandbox_config: cri.PodSandboxConfig
    ) -> str:
        resp = self._runtime(
            "CreateContainer",
            cri.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox_config
            ),
            cri.CreateContainerResponse,
        )
        self.created_ids.add(resp.container_id)
        return resp.container_id

    def start_container(self, container_id: str) -> None:
        self._runtime("StartContainer", cri.StartContainerRequest(container_id=container_id),
                      cri.StartContainerResponse)  # fmt: skip

    def stop_container(self, container_id: str, timeout: int = 0) -> None:
        self._runtime(
            "StopContainer",
            cri.StopContainerRequest(container_id=container_id, timeout=timeout),
            cri.StopContainerResponse,
            timeout=self.timeout + timeout,
        )

    def remove_container(self, container_id: str) -> None:
        self._runtime("RemoveContainer", cri.RemoveContainerRequest(container_id=container_id),
                      cri.RemoveContainerResponse)  # fmt: skip

    def list_containers(self, pod_id: str = "") -> list[cri.Container]:
        request = cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=pod_id))
        return list(self._runtime("ListContainers", request, cri.ListContainersResponse).containers)

    def container_status(self, container_id: str, verbose: bool = False) -> cri.ContainerStatusResponse:  # fmt: skip  # noqa: E501
        return self._runtime(
            "ContainerStatus",
            cri.ContainerStatusRequest(container_id=container_id, verbose=verbose),
            cri.ContainerStatusResponse,
        )

    def update_container_resources(
        self, container_id: str, resources: cri.LinuxContainerResources
    ) -> None:
        self._runtime(
            "UpdateContainerResources",
            cri.UpdateContainerResourcesRequest(container_id=container_id, linux=resources),
            cri.UpdateContainerResourcesResponse,
        )

    def exec_sync(self, container_id: str, cmd: list[str], timeout: int = 30) -> cri.ExecSyncResponse:  # fmt: skip  # noqa: E501
        return self._runtime(
            "ExecSync",
            cri.ExecSyncRequest(container_id=container_id, cmd=cmd, timeout=timeout),
            cri.ExecSyncResponse,
            timeout=timeout + 30,
        )

    def exec(self, request: cri.ExecRequest) -> str:
        return self._runtime("Exec", request, cri.ExecResponse).url

    def attach(self, request: cri.AttachRequest) -> str:
        return self._runtime("Attach", request, cri.AttachResponse).url

    def container_stats(self, container_id: str) -> cri.ContainerStats:
        resp = self._runtime(
            "ContainerStats",
            cri.ContainerStatsRequest(container_id=container_id),
            cri.ContainerStatsResponse,
        )
        return resp.stats

    def checkpoint_container(self, container_id: str, location: str, timeout: float) -> None:
        """An archive of the running container at ``location`` (containerd >= 2.0)."""
        self._runtime(
            "CheckpointContainer",
            cri.CheckpointContainerRequest(container_id=container_id, location=location),
            cri.CheckpointContainerResponse,
            timeout,
        )

    def image_status(self, image: str) -> cri.ImageStatusResponse:
        return self._call(
            "ImageService",
            "ImageStatus",
            cri.ImageStatusRequest(image=cri.ImageSpec(image=image)),
            cri.ImageStatusResponse,
        )

    def pull_image(self, image: str, timeout: float | None = None) -> str:
        resp = self._call(
            "ImageService",
            "PullImage",
            cri.PullImageRequest(image=cri.ImageSpec(image=image)),
            cri.PullImageResponse,
            timeout,
        )
        return resp.image_ref


# -- images ------------------------------------------------------------------------------

PAUSE_C = r"""
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
/* The pod's init: holds the namespaces, reaps what is reparented to it, and leaves
   at once on SIGTERM/SIGINT (the CRI plugin stops sandboxes with SIGKILL anyway). */
static void done(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
    signal(SIGTERM, done);
    signal(SIGINT, done);
    signal(SIGCHLD, reap);
    for (;;) pause();
}
"""


def build_image_archive(rootfs: Path, dest_tar: Path, ref: str, config: dict[str, Any]) -> Path:
    """An OCI image layout tar (one layer from ``rootfs``) that ``ctr images import`` takes."""
    import io
    import tarfile

    layer = images._layer_tar(rootfs)
    layer_gz = images._gzip(layer)
    arch = images._oci_arch()
    config_bytes = images._canonical({
        "architecture": arch,
        "os": "linux",
        "created": "2000-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [images._digest(layer)]},
    })  # fmt: skip
    layer_desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                  "digest": images._digest(layer_gz), "size": len(layer_gz)}  # fmt: skip
    manifest_bytes = images._canonical({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": images._digest(config_bytes), "size": len(config_bytes)},
        "layers": [layer_desc],
    })  # fmt: skip
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": images._digest(manifest_bytes),
            "size": len(manifest_bytes),
            "platform": {"architecture": arch, "os": "linux"},
            "annotations": {"io.containerd.image.name": ref,
                            "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1]},
        }],
    }  # fmt: skip
    files = {
        "oci-layout": images._canonical({"imageLayoutVersion": "1.0.0"}),
        "index.json": images._canonical(index),
    }
    for blob in (layer_gz, config_bytes, manifest_bytes):
        files["blobs/sha256/" + images._digest(blob).removeprefix("sha256:")] = blob
    dest_tar.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest_tar, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("blobs/", "blobs/sha256/"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(files[name]), 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    return dest_tar


def build_pause_archive(dest_tar: Path, ref: str = PAUSE_REF) -> Path:
    """The sandbox image: one static binary, /pause, as entrypoint."""
    work = Path(tempfile.mkdtemp(prefix="pyshim-pause-"))
    try:
        (work / "pause.c").write_text(PAUSE_C)
        rootfs = work / "rootfs"
        rootfs.mkdir()
        subprocess.run(
            ["gcc", "-static", "-Os", "-s", "-o", str(rootfs / "pause"), str(work / "pause.c")],
            check=True,
            capture_output=True,
            timeout=120,
        )
        return build_image_archive(rootfs, dest_tar, ref, {"Entrypoint": ["/pause"]})
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- the node ----------------------------------------------------------------------------


def _free_subnet() -> str:
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True)
    for _ in range(50):
        candidate = f"10.88.{secrets.randbelow(150) + 100}"
        if f"{candidate}." not in routes.stdout:
            return candidate
    raise RuntimeError("no free 10.88.x.0/24 subnet found")


@dataclass(frozen=True)
class Network:
    name: str
    bridge: str
    prefix: str  # "10.88.N"; the pod subnet is prefix.0/24, the bridge prefix.1

    @property
    def subnet(self) -> str:
        return f"{self.prefix}.0/24"


def _cri_config(
    tmp: Path,
    *,
    net_conf_dir: Path,
    stream_port: int,
    host: Host = DEBIAN,
    systemd_cgroup: bool = False,
) -> str:
    if host.v2:
        return _cri_config_v3(
            net_conf_dir=net_conf_dir, stream_port=stream_port, systemd_cgroup=systemd_cgroup
        )
    cri_plugin = '[plugins."io.containerd.grpc.v1.cri"]'
    systemd = _systemd_options('[plugins."io.containerd.grpc.v1.cri"]', systemd_cgroup)
    return f"""
{cri_plugin}
  sandbox_image = "{PAUSE_REF}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "{stream_port}"
  enable_tls_streaming = false
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "pyshim"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.pyshim]
      runtime_type = "{PYSHIM_RUNTIME}"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "{GO_RUNTIME}"{systemd}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{net_conf_dir}"
    max_conf_num = 1
"""


def _systemd_options(plugin: str, systemd_cgroup: bool) -> str:
    """How users pick runc's systemd cgroup driver: an options section per runtime
    (containerd hands pyshim's to it as TOML, runc's as its own options type)."""
    if not systemd_cgroup:
        return ""
    runtimes = f"{plugin[:-1]}.containerd.runtimes"
    return f"""
    {runtimes}.pyshim.options]
      SystemdCgroup = true
    {runtimes}.runc.options]
      SystemdCgroup = true"""


def _cri_config_v3(*, net_conf_dir: Path, stream_port: int, systemd_cgroup: bool = False) -> str:
    """containerd 2.x (config version 3): CRI is split into a runtime plugin (runtimes,
    CNI, OOM score, ...) and an images plugin (snapshotter, the pinned pause image);
    the streaming server stays with io.containerd.grpc.v1.cri."""
    runtime = '[plugins."io.containerd.cri.v1.runtime"]'
    systemd = _systemd_options(runtime, systemd_cgroup)
    images = '[plugins."io.containerd.cri.v1.images"]'
    return f"""
{images}
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{PAUSE_REF}"
{runtime}
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "pyshim"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.pyshim]
      runtime_type = "{PYSHIM_RUNTIME}"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "{GO_RUNTIME}"{systemd}
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.{PYSHIM_AS_RUNC}]
      runtime_type = "{GO_RUNTIME}"
      runtime_path = "{PYSHIM_SHIM_BINARY}"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{CNI_BIN_DIR}"]
    conf_dir = "{net_conf_dir}"
    max_conf_num = 1
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "{stream_port}"
  enable_tls_streaming = false
"""


class CriNode:
    """A private containerd + CRI + CNI bridge; ``close()`` removes every trace."""

    def __init__(
        self,
        *,
        busybox_archive: Path,
        pause_archive: Path,
        host: Host = DEBIAN,
        systemd_cgroup: bool = False,
    ) -> None:
        self.host = host
        token = secrets.token_hex(3)
        self.network = Network(name=f"pyshim-{token}", bridge=f"pysh{token}", prefix=_free_subnet())
        self.systemd_cgroup = systemd_cgroup
        # With systemd's driver the parent is a slice (a kubelet's kubepods.slice), each
        # pod's a slice inside it ("-" nests in slice names).
        self.cgroup_parent = f"pyshimcri{token}.slice" if systemd_cgroup else f"/pyshim-cri-{token}"
        self.stream_port = free_port()
        self.containerd: Containerd | None = None
        self.client: CriClient | None = None
        self._closed = False
        try:
            self.containerd = Containerd(cri=True, extra_config=self._write_config, host=host)
            self.log_dir = self.containerd.tmp / "pod-logs"
            self.log_dir.mkdir()
            for archive in (pause_archive, busybox_archive):
                self.containerd.ctr("images", "import", str(archive), namespace=CRI_NAMESPACE,
                                    timeout=120)  # fmt: skip
            self.client = CriClient(self.containerd.address)
            self._wait_ready(images=(PAUSE_REF, BUSYBOX_REF))
        except BaseException:
            self.close()
            raise

    def _write_config(self, tmp: Path) -> str:
        conf_dir = tmp / "cni" / "net.d"
        conf_dir.mkdir(parents=True)
        self.ipam_dir = tmp / "cni" / "ipam"
        net = self.network
        conflist = {
            "cniVersion": "1.0.0",
            "name": net.name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": net.bridge,
                    "isGateway": True,
                    # No masquerading: nothing leaves this host's bridge, and no
                    # iptables rules are left to clean up.
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": net.subnet, "gateway": f"{net.prefix}.1"}]],
                        "dataDir": str(self.ipam_dir),
                    },
                }
            ],
        }
        (conf_dir / "10-pyshim.conflist").write_text(json.dumps(conflist, indent=2))
        return _cri_config(tmp, net_conf_dir=conf_dir, stream_port=self.stream_port,
                           host=self.host, systemd_cgroup=self.systemd_cgroup)  # fmt: skip

    def _wait_ready(self, images: Sequence[str], timeout: float = 30.0) -> None:
        """Until the runtime and network are ready and CRI lists every imported image.

        CRI learns of an image `ctr images import` created from containerd's events,
        one image after another: that the first is listed says nothing of the last
        (a test once found busybox missing while pause was there, containerd 2.3)."""
        assert self.client is not None
        deadline = time.monotonic() + timeout
        conditions: dict[str, bool] = {}
        missing = list(images)
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                status = self.client.status()
                conditions = {c.type: c.status for c in status.status.conditions}
                missing = [ref for ref in images if not self.client.image_status(ref).image.id]
                if (
                    conditions.get("RuntimeReady")
                    and conditions.get("NetworkReady")
                    and not missing
                ):
                    return
            time.sleep(0.1)
        raise RuntimeError(
            f"CRI not ready after {timeout}s: {conditions}, images missing: {missing}"
        )

    # -- helpers for tests ----------------------------------------------------------

    def pod_config(self, name: str, *, uid: str | None = None) -> cri.PodSandboxConfig:
        uid = uid or secrets.token_hex(8)
        pod_log_dir = self.log_dir / f"default_{name}_{uid}"
        pod_log_dir.mkdir(parents=True, exist_ok=True)
        return cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace="default"),
            hostname=name,
            log_directory=str(pod_log_dir),
            linux=cri.LinuxPodSandboxConfig(
                cgroup_parent=(
                    f"{self.cgroup_parent.removesuffix('.slice')}-pod{uid}.slice"
                    if self.systemd_cgroup
                    else f"{self.cgroup_parent}/pod{uid}"
                ),
                security_context=cri.LinuxSandboxSecurityContext(
                    namespace_options=cri.NamespaceOption(
                        network=cri.POD, pid=cri.CONTAINER, ipc=cri.POD
                    )
                ),
            ),
        )

    def shim_binaries(self) -> dict[int, str]:
        """pid -> the shim binary of every shim process serving this containerd.

        The binary is the first argv word named `containerd-shim-*`: pyshim's daemon
        may run as `python -IS <binary> …` (re-exec through its launcher).
        """
        assert self.containerd is not None
        found = {}
        for pid in self.containerd.shim_pids():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                words = [a.decode(errors="replace") for a in argv]
                found[pid] = next(
                    (w for w in words if os.path.basename(w).startswith("containerd-shim-")),
                    " ".join(words[:2]),
                )
        return found

    def bridge_exists(self) -> bool:
        return Path(f"/sys/class/net/{self.network.bridge}").exists()

    def bridge_ports(self) -> list[str]:
        brif = Path(f"/sys/class/net/{self.network.bridge}/brif")
        return sorted(p.name for p in brif.iterdir()) if brif.is_dir() else []

    def ipam_leases(self) -> list[str]:
        """IP addresses host-local still has allocated on our network."""
        d = self.ipam_dir / self.network.name
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.name.startswith(self.network.prefix))

    def cni_results(self) -> list[Path]:
        if not CNI_RESULTS_DIR.is_dir():
            return []
        return sorted(CNI_RESULTS_DIR.glob(f"{self.network.name}-*"))

    # -- cleanup --------------------------------------------------------------------

    def remove_all_pods(self) -> list[str]:
        errors: list[str] = []
        if self.client is None:
            return errors
        try:
            pods = self.client.list_pod_sandboxes()
        except grpc.RpcError as exc:
            return [f"ListPodSandbox: {exc}"]
        for pod in pods:
            for step in (self.client.stop_pod_sandbox, self.client.remove_pod_sandbox):
                try:
                    step(pod.id)
                except grpc.RpcError as exc:
                    errors.append(f"{step.__name__} {pod.id}: {exc}")
        return errors

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        if self.containerd is not None and self.containerd.running:
            errors += self.remove_all_pods()
        if self.client is not None:
            self.client.close()
        if self.containerd is not None:
            try:
                self.containerd.close()
            except Exception as exc:
                errors.append(f"containerd cleanup: {exc!r}")
        self._runc_leftovers()
        if self.bridge_exists():
            subprocess.run(["ip", "link", "del", self.network.bridge], capture_output=True,
                           timeout=20, check=False)  # fmt: skip
        for result in self.cni_results():
            with contextlib.suppress(OSError):
                result.unlink()
        self._cgroup_leftovers()
        if errors:
            raise RuntimeError("; ".join(errors))

    def _runc_leftovers(self) -> None:
        # k8s.io's runc root is shared with any other CRI containerd on the host: only
        # ids this node created are touched.
        root = RUNC_ROOT / CRI_NAMESPACE
        ids = self.client.created_ids if self.client is not None else set()
        for cid in ids:
            if (root / cid).exists():
                for args in (["kill", cid, "KILL"], ["delete", "--force", cid]):
                    subprocess.run(["runc", "--root", str(root), *args], capture_output=True,
                                   timeout=20, check=False)  # fmt: skip

    def _cgroup_leftovers(self) -> None:
        if not CGROUP_ROOT.is_dir():
            return
        if self.systemd_cgroup:
            # The slices are systemd's units: stopped through it, never rmdir'd.
            subprocess.run(["systemctl", "stop", self.cgroup_parent], capture_output=True,
                           timeout=30, check=False)  # fmt: skip
        name = self.cgroup_parent.lstrip("/")
        for top in [CGROUP_ROOT / name, *(p / name for p in CGROUP_ROOT.iterdir() if p.is_dir())]:
            if not top.is_dir():
                continue
            for sub in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if sub.is_dir():
                    with contextlib.suppress(OSError):
                        sub.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()

    def leftovers(self) -> list[str]:
        """What close() should have removed but did not (empty when clean)."""
        found = []
        if self.bridge_exists():
            found.append(f"bridge {self.network.bridge}")
        found += [f"CNI result {p}" for p in self.cni_results()]
        name = self.cgroup_parent.lstrip("/")
        found += [f"cgroup {p / name}" for p in CGROUP_ROOT.iterdir() if (p / name).exists()]
        if (CGROUP_ROOT / name).exists():  # the unified hierarchy
            found.append(f"cgroup {CGROUP_ROOT / name}")
        if self.containerd is not None:
            if self.containerd.tmp.exists():
                found.append(f"temp dir {self.containerd.tmp}")
            found += [f"shim {pid}" for pid in self.containerd.shim_pids()]
        root = RUNC_ROOT / CRI_NAMESPACE
        ids = self.client.created_ids if self.client is not None else set()
        found += [f"runc state {cid}" for cid in ids if (root / cid).exists()]
        return found


@contextlib.contextmanager
def cri_node(*, busybox_archive: Path, pause_archive: Path) -> Iterator[CriNode]:
    node = CriNode(busybox_archive=busybox_archive, pause_archive=pause_archive)
    try:
        yield node
    finally:
        node.close()


# -- CRI container logs ------------------------------------------------------------------


@dataclass(frozen=True)
class LogLine:
    timestamp: str
    stream: str
    partial: bool
    content: str


def parse_cri_log(text: str) -> list[LogLine]:
    """The kubelet's CRI log format: ``<RFC3339Nano> <stdout|stderr> <P|F> <content>``."""
    lines = []
    for raw in text.splitlines():
        timestamp, stream, tag, content = [*raw.split(" ", 3), ""][:4]
        if stream not in ("stdout", "stderr") or tag not in ("P", "F"):
            raise ValueError(f"not a CRI log line: {raw!r}")
        lines.append(LogLine(timestamp, stream, tag == "P", content))
    return lines


# -- streaming exec over WebSocket (channel.k8s.io) --------------------------------------

_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)


@dataclass
class ExecResult:
    stdout: bytes
    stderr: bytes
    status: dict[str, Any]


def _ws_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    # Client frames must be masked (RFC 6455 §5.3).
    mask = os.urandom(4)
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class _WsReader:
    def __init__(self, sock: socket.socket, initial: bytes) -> None:
        self._sock = sock
        self._buf = initial

    def _need(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise EOFError
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def frame(self) -> tuple[int, bytes]:
        b0, b1 = self._need(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._need(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._need(8))
        mask = self._need(4) if b1 & 0x80 else b""
        payload = self._need(n)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return b0 & 0x0F, payload


def ws_exec(
    url: str,
    *,
    stdin: bytes = b"",
    resize: tuple[int, int] | None = None,
    timeout: float = 30.0,
) -> ExecResult:
    """Run a CRI Exec URL to completion over WebSocket (protocol v4.channel.k8s.io)."""
    u = urllib.parse.urlsplit(url)
    assert u.hostname is not None and u.port is not None, url
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as sock:
        target = u.path + (f"?{u.query}" if u.query else "")
        sock.sendall(
            (
                f"GET {target} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: v4.channel.k8s.io\r\n"
                f"Origin: http://{u.netloc}\r\n\r\n"
            ).encode()
        )
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"no handshake answer: {raw!r}")
            raw += chunk
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode(errors="replace").split("\r\n")
        if " 101 " not in lines[0] + " ":
            raise ConnectionError(f"websocket upgrade refused: {head!r}")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])
        }
        expected = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != expected:
            raise ConnectionError(f"bad Sec-WebSocket-Accept: {headers}")
        if resize is not None:
            size = json.dumps({"Width": resize[0], "Height": resize[1]}).encode()
            sock.sendall(_ws_frame(bytes([RESIZE]) + size))
        if stdin:
            sock.sendall(_ws_frame(bytes([STDIN]) + stdin))
        reader = _WsReader(sock, rest)
        out = {STDOUT: b"", STDERR: b""}
        status: dict[str, Any] = {}
        while True:
            try:
                opcode, payload = reader.frame()
            except EOFError:
                break
            if opcode == 0x8:  # close
                break
            if opcode == 0x9:  # ping
                sock.sendall(_ws_frame(payload, opcode=0xA))
                continue
            if opcode not in (0x0, 0x1, 0x2) or not payload:
                continue
            channel, data = payload[0], payload[1:]
            if channel in out:
                out[channel] += data
            elif channel == ERROR and data:
                status = json.loads(data)
        with contextlib.suppress(OSError):
            sock.sendall(_ws_frame(b"", opcode=0x8))
    return ExecResult(out[STDOUT], out[STDERR], status)


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)
