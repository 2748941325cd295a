"""The manager's containers: launch, exits, exec, removal and reconnect after a restart.

Every exit is written to the container's record before anyone is told; the first exit
learned for a process wins and a different one arriving later is logged and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import re
import secrets
import shutil
import signal
import time
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import any_pb2

from manager import metrics, units
from manager import network as cni
from manager import spec as ocispec
from manager.images import ImageStore
from manager.launcher import ShimLauncher, ShimLaunchError
from manager.logindex import LogIndexer
from manager.paths import Paths
from manager.records import ContainerRecord, MountSpec, PortSpec, RecordStore, UserMount
from manager.shimclient import CHECKPOINT_TIMEOUT, ShimClient
from manager.shimlog import LogRelay, make_log_fifo
from manager.volumes import VolumeError, VolumeStore
from protocol.proto import anyutil, timeutil
from protocol.proto.manager.v1 import manager_pb2
from protocol.proto.runc import options_pb2
from protocol.proto.task.v2 import shim_pb2
from protocol.proto.types import mount_pb2, task_pb2
from protocol.ttrpc.status import Code, ConnectionClosedError, TtrpcError

log = logging.getLogger("pyshimd")
T = TypeVar("T")
U = TypeVar("U")

# containerd's identifier rule; ids and names both end up in paths and runc ids.
_IDENT = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
MAX_IDENT = 76
PROCESS_SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
# How long `rm -f` waits for the container to die after SIGKILL before tearing down.
FORCE_KILL_WAIT = 10.0
# After Shutdown the shim closes its socket as it exits; past this it is stopped by force.
SHIM_EXIT_WAIT = 3.0
MNT_DETACH = 2
# `stop`'s grace before SIGKILL when none is given (docker's).
DEFAULT_STOP_TIMEOUT = 10.0
# Restart back-off (docker's): doubles from the first delay up to the cap; a run that
# lasted RESTART_RESET seconds starts the series again.
RESTART_FIRST_DELAY = 0.1
RESTART_MAX_DELAY = 60.0
RESTART_RESET = 10.0
RESTART_POLICIES = ("no", "on-failure", "always", "unless-stopped")
# The first file CRIU writes into every image directory.
CRIU_INVENTORY = "inventory.img"


def _check_checkpoint_dir(path: str) -> None:
    """Refuse what is no CRIU image directory before the container is touched."""
    if not os.path.isabs(path):
        raise TtrpcError(Code.INVALID_ARGUMENT, f"--checkpoint {path!r}: must be absolute")
    if not os.path.isdir(path):
        raise TtrpcError(Code.INVALID_ARGUMENT, f"--checkpoint {path}: not a directory")
    if not os.path.isfile(os.path.join(path, CRIU_INVENTORY)):
        raise TtrpcError(
            Code.INVALID_ARGUMENT,
            f"--checkpoint {path}: no checkpoint there (CRIU's {CRIU_INVENTORY} is missing; "
            "make one with `pyshim checkpoint NAME --output DIR`)",
        )


def valid_identifier(value: str) -> bool:
    return len(value) <= MAX_IDENT and _IDENT.match(value) is not None


def _now_ns() -> int:
    return time.time_ns()


def _file_uri(path: Path) -> str:
    return "file://" + str(path)


@dataclass
class Container:
    record: ContainerRecord
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    client: ShimClient | None = None
    relay: LogRelay | None = None
    monitor: asyncio.Task[None] | None = None
    removing: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # exec id -> the one task that waits for and deletes it; every waiter shares it.
    exec_waits: dict[str, asyncio.Task[shim_pb2.WaitResponse]] = field(default_factory=dict)
    # A restart the policy scheduled (sleeping out its back-off); cancelled by stop/rm.
    restart_task: asyncio.Task[None] | None = None
    restart_delay: float = RESTART_FIRST_DELAY

    @property
    def id(self) -> str:
        return self.record.id


def wants_restart(rec: ContainerRecord) -> bool:
    """Whether the restart policy brings this exited container back (docker's rules)."""
    if rec.manually_stopped or rec.auto_remove or rec.exit_status is None:
        return False
    if rec.restart_policy in ("always", "unless-stopped"):
        return True
    if rec.restart_policy == "on-failure":
        return rec.exit_status != 0 and (
            rec.restart_max == 0 or rec.restart_count < rec.restart_max
        )
    return False


def signal_number(text: str) -> int:
    """``SIGQUIT``, ``QUIT`` or ``3`` (an image's StopSignal, --stop-signal)."""
    t = text.strip().upper()
    if t.isdigit() and 0 < int(t) < signal.NSIG:
        return int(t)
    try:
        return int(signal.Signals[t if t.startswith("SIG") else "SIG" + t])
    except KeyError:
        raise ocispec.SpecError(f"unknown signal {text!r}") from None


def _not_found(ref: str) -> TtrpcError:
    return TtrpcError(Code.NOT_FOUND, f"no such container: {ref} (see `pyshim ps --all`)")


class Supervisor:
    def __init__(
        self,
        paths: Paths,
        store: RecordStore,
        launcher: ShimLauncher,
        images: ImageStore,
        network: cni.BridgeNetwork | None = None,
        runc_binary: str = "",
    ) -> None:
        self.paths = paths
        # The shims' runc ("" = runc on PATH).
        self.runc_binary = runc_binary
        self.network = network or cni.BridgeNetwork(ipam_dir=str(paths.cni_ipam_dir))
        self.volumes = VolumeStore(paths.volumes_dir, valid_identifier)
        # Set by pyshimd once its loop runs; None = no `logs -t` times (unit tests).
        self.log_index: LogIndexer | None = None
        self.store = store
        self.launcher = launcher
        self.images = images
        self.containers: dict[str, Container] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # The network's masquerade rule: checked (and added) once per pyshimd.
        self._masquerade: asyncio.Future[bool] | None = None

    # ------------------------------------------------------------------ lookup

    def lookup(self, ref: str) -> Container:
        """By id, then by name, then by an unambiguous id prefix."""
        if not ref:
            raise TtrpcError(Code.INVALID_ARGUMENT, "container id or name is required")
        c = self.containers.get(ref)
        if c is not None:
            return c
        for c in self.containers.values():
            if c.record.name == ref:
                return c
        matches = [c for cid, c in self.containers.items() if cid.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        raise _not_found(ref)

    def containers_list(self, all: bool) -> list[Container]:
        found = [c for c in self.containers.values() if all or not c.record.exited]
        return sorted(found, key=lambda c: c.record.created_at_ns)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ exits

    def record_exit(self, c: Container, status: int, exited_at_ns: int, reason: str = "") -> None:
        rec = c.record
        if rec.exit_status is not None:
            if rec.exit_status != status:
                log.warning(
                    "container %s: ignoring a second exit %d (already recorded %d)",
                    c.id,
                    status,
                    rec.exit_status,
                )
            return
        rec.exit_status = status
        rec.exited_at_ns = exited_at_ns or _now_ns()
        rec.exit_reason = reason
        rec.status = "stopped"
        restart = wants_restart(rec) and not c.removing
        if restart:
            rec.status = "restarting"
        # Synced before waiters learn it, unless the container is --rm: recovery removes
        # one of those whatever exit its record holds (or finds none: shim gone, 255).
        self.store.save(rec, durable=not rec.auto_remove)
        log.info(
            "container %s exited with status %d%s", c.id, status, f" ({reason})" * bool(reason)
        )
        c.exited.set()
        if rec.auto_remove and not c.removing:
            self._spawn(self._auto_remove(c))
        elif restart:
            self._schedule_restart(c)

    def _schedule_restart(self, c: Container) -> None:
        """Start it again after the back-off; a run that lasted long resets the back-off."""
        if c.restart_task is not None and not c.restart_task.done():
            return
        rec = c.record
        ran_s = (rec.exited_at_ns - rec.started_at_ns) / 1e9 if rec.started_at_ns else 0.0
        if ran_s >= RESTART_RESET:
            c.restart_delay = RESTART_FIRST_DELAY
        delay = c.restart_delay
        c.restart_delay = min(RESTART_MAX_DELAY, c.restart_delay * 2)
        log.info("container %s: restarting in %.1fs (policy %s)", c.id, delay, rec.restart_policy)
        c.restart_task = asyncio.create_task(self._restart_later(c, delay))

    async def _restart_later(self, c: Container, delay: float) -> None:
        await asyncio.sleep(delay)
        if c.removing or not wants_restart(c.record):
            return
        c.record.restart_count += 1
        # Done waiting: a failed start below may schedule the next try.
        c.restart_task = None
        try:
            await self._start_again(c)
        except Exception as exc:
            # Counted as a failed run, as docker does: the policy tries again later.
            log.warning("container %s: restart failed: %s", c.id, exc)
            if not c.record.exited:
                self.record_exit(c, 255, 0, f"restart failed: {exc}")
            elif wants_restart(c.record) and not c.removing:
                # It failed before the container's last exit was cleared: no new exit
                # comes to schedule the next try.
                self._schedule_restart(c)

    async def _auto_remove(self, c: Container) -> None:
        try:
            await self.remove(c.id, force=True)
        except Exception:
            log.exception("auto-removing container %s", c.id)

    def on_task_exit(self, container_id: str, process_id: str, status: int, at_ns: int) -> None:
        """A /tasks/exit event; the init's exit has process_id == container_id."""
        c = self.containers.get(container_id)
        if c is None or process_id != container_id:
            return
        if at_ns and at_ns < c.record.started_at_ns:
            # Replayed from a shim of an earlier run of this container.
            return
        self.record_exit(c, status, at_ns)

    def on_oom(self, container_id: str) -> None:
        """A /tasks/oom event: the kernel's OOM killer acted in this container."""
        c = self.containers.get(container_id)
        if c is None or c.record.oom_killed:
            return
        c.record.oom_killed = True
        self.store.save(c.record)
        log.warning("container %s: OOM killed", c.id)

    async def _monitor(self, c: Container) -> None:
        """Waits on the shim for the init's exit; a dropped connection means the shim died."""
        client = c.client
        assert client is not None
        try:
            resp = await client.wait(c.id)
        except ConnectionClosedError:
            if not c.removing:
                await self._shim_lost(c, "the shim exited unexpectedly")
            return
        except TtrpcError as exc:
            log.warning("container %s: Wait failed: %s", c.id, exc)
            return
        self.record_exit(c, resp.exit_status, timeutil.ns_from_timestamp(resp.exited_at))
        if not c.removing:
            await self._watch_stopped(c)

    async def _shim_lost(self, c: Container, why: str) -> None:
        """Run the shim's `delete` (it kills what is left) and keep what it tells us."""
        log.warning("container %s: %s; cleaning up with the shim's delete", c.id, why)
        if c.client is not None:
            c.client.close()
            c.client = None
        started = _now_ns()
        try:
            resp = await self.launcher.delete(c.id, Path(c.record.bundle))
        except ShimLaunchError as exc:
            # containerd's convention for a delete that failed: 255 at "now".
            c.record.shim_gone = True
            self.store.save(c.record)
            self.record_exit(c, 255, 0, f"{why}; cleanup failed ({exc}); exit status unknown")
            return
        c.record.shim_gone = True
        self.store.save(c.record)
        at = timeutil.ns_from_timestamp(resp.exited_at)
        # The shim's delete reports a persisted exit when it has one; otherwise it makes
        # up 137 at "now", which we recognise by a time after we called it.
        if at >= started:
            reason = f"{why}; the real exit status is unknown (the container was killed)"
        else:
            reason = f"{why}; exit status recovered from the shim's record"
        self.record_exit(c, resp.exit_status, at, reason)

    # ------------------------------------------------------------------ run

    def _new_id(self) -> str:
        while True:
            cid = secrets.token_hex(8)
            if cid not in self.containers and not self.paths.container_dir(cid).exists():
                return cid

    async def run(self, cfg: manager_pb2.ContainerConfig) -> Container:
        cid = self._new_id()
        name = cfg.name or cid[:12]
        if not valid_identifier(name):
            raise TtrpcError(
                Code.INVALID_ARGUMENT,
                f"invalid name {name!r}: use letters, digits and single . _ - between them",
            )
        if any(c.record.name == name for c in self.containers.values()):
            raise TtrpcError(
                Code.ALREADY_EXISTS,
                f"name {name!r} is already in use; remove it with `pyshim rm {name}` first",
            )
        if cfg.image and cfg.rootfs:
            raise TtrpcError(Code.INVALID_ARGUMENT, "give either an image or --rootfs, not both")
        policy = cfg.restart_policy or "no"
        if policy not in RESTART_POLICIES:
            raise TtrpcError(
                Code.INVALID_ARGUMENT,
                f"invalid restart policy {policy!r}: no, on-failure[:N], always, unless-stopped",
            )
        if policy != "no" and cfg.auto_remove:
            raise TtrpcError(Code.INVALID_ARGUMENT, "--rm and --restart cannot be combined")
        network = cfg.network or "bridge"
        if network not in cni.NETWORK_MODES:
            raise TtrpcError(
                Code.INVALID_ARGUMENT, f"unknown network {network!r}: bridge, host or none"
            )
        ports = self._check_ports(cfg, network)
        mounts = self._check_mounts(cfg)
        bundle = self.paths.bundle(cid)
        record = ContainerRecord(
            id=cid,
            name=name,
            bundle=str(bundle),
            created_at_ns=_now_ns(),
            command=list(cfg.args),
            image=cfg.image,
            terminal=cfg.terminal,
            stdin=cfg.stdin,
            auto_remove=cfg.auto_remove,
            restart_policy=policy,
            restart_max=cfg.restart_max if policy == "on-failure" else 0,
            network=network,
            ports=ports,
            mounts=mounts,
        )
        c = Container(record)
        # Reserve the name before the first await so a concurrent run cannot take it.
        self.containers[cid] = c
        try:
            async with c.lock:
                await self._create_and_start(c, cfg)
        except BaseException as exc:
            log.warning("container %s: run failed: %s", cid, exc)
            await self._teardown(c)
            if isinstance(exc, TtrpcError):
                raise TtrpcError(exc.code, f"cannot start container {name}: {exc.message}") from exc
            if isinstance(
                exc, ocispec.SpecError | ShimLaunchError | cni.NetworkError | OSError | ValueError
            ):
                raise TtrpcError(Code.UNKNOWN, str(exc)) from exc
            raise
        return c

    def _prepare_bundle(
        self, c: Container, cfg: manager_pb2.ContainerConfig
    ) -> list[mount_pb2.Mount]:
        cid = c.id
        bundle = Path(c.record.bundle)
        image_defaults: ocispec.ImageDefaults | None = None
        mounts: list[mount_pb2.Mount] = []
        links: list[tuple[str, str]] = []
        cdir = self.paths.container_dir(cid)
        cdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if cfg.image:
            image = self.images.resolve(cfg.image)
            image_defaults = image.defaults
            mounts.append(self.images.overlay_mount(image, cdir / "overlay"))
            root = ocispec.RootView(path="rootfs")
            c.record.image = image.ref
            if image.stop_signal:
                c.record.stop_signal = signal_number(image.stop_signal)
        elif cfg.rootfs:
            rootfs = Path(cfg.rootfs)
            if not rootfs.is_absolute() or not rootfs.is_dir():
                raise ocispec.SpecError(f"--rootfs {cfg.rootfs}: not an absolute directory")
            root = ocispec.RootView(path=str(rootfs))
        else:
            root, links = ocispec.host_view()
        process = ocispec.resolve_process(
            ocispec.ProcessOptions(
                args=list(cfg.args),
                env=list(cfg.env),
                workdir=cfg.workdir,
                user=cfg.user,
                terminal=cfg.terminal,
                console_size=(cfg.tty_width, cfg.tty_height),
            ),
            image_defaults,
        )
        c.record.command = list(process.args)
        if cfg.stop_signal:
            c.record.stop_signal = signal_number(cfg.stop_signal)
        c.record.rootfs_mounts = [
            MountSpec(type=m.type, source=m.source, options=list(m.options)) for m in mounts
        ]
        cgroups_path = f"/pyshim/{cid}" if cfg.memory_bytes or cfg.cpus else None
        spec = ocispec.container_spec(
            process,
            root,
            hostname=c.record.name[:63],
            memory_bytes=cfg.memory_bytes,
            cpus=cfg.cpus,
            cgroups_path=cgroups_path,
            network=c.record.network,
            netns_path=str(self.paths.netns(cid)),
            extra_mounts=self._spec_mounts(c.record),
        )
        if not c.record.auto_remove:
            # A --rm container never starts again; any other may, after a reboot too.
            source = {"config": spec, "links": links}
            self.paths.bundle_source(cid).write_text(json.dumps(source))
        _write_bundle(bundle, spec, links)
        self.paths.log(cid).touch(mode=0o640)
        if cfg.stdin:
            self._make_stdin_fifo(cid)
        return mounts

    def _make_stdin_fifo(self, cid: str) -> None:
        fifo_dir = self.paths.fifo_dir(cid)
        fifo_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.mkfifo(fifo_dir / "stdin", 0o600)

    async def _remake_after_reboot(self, c: Container) -> None:
        """The run dir is a tmpfs: after a reboot a container's bundle, network namespace
        and stdin fifo are gone, and its network's lease and rules are stale. Made again
        from what the state dir keeps, the network joined anew (as at its first start)."""
        rec = c.record
        try:
            source = json.loads(self.paths.bundle_source(c.id).read_text())
            spec, links = source["config"], [(n, t) for n, t in source["links"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ocispec.SpecError(f"its bundle is gone and cannot be made again: {exc}") from exc
        log.info("container %s: making its bundle and network again (after a reboot)", c.id)
        await self._release_network(c)
        rec.cni_result = {}
        rec.ip_address = ""
        self._make_netns(c)
        _write_bundle(Path(rec.bundle), spec, links)
        if rec.stdin:
            self._make_stdin_fifo(c.id)
        await self._cni_add(c)

    def _check_mounts(self, cfg: manager_pb2.ContainerConfig) -> list[UserMount]:
        found: list[UserMount] = []
        seen: set[str] = set()
        for m in cfg.mounts:
            dest = m.destination
            if not dest.startswith("/") or os.path.normpath(dest) == "/":
                raise TtrpcError(
                    Code.INVALID_ARGUMENT,
                    f"mount destination {dest!r} must be an absolute path other than /",
                )
            dest = os.path.normpath(dest)
            if dest in seen:
                raise TtrpcError(Code.INVALID_ARGUMENT, f"two mounts on {dest}")
            seen.add(dest)
            if m.type == "bind":
                if not m.source.startswith("/"):
                    raise TtrpcError(
                        Code.INVALID_ARGUMENT, f"bind source {m.source!r} must be absolute"
                    )
                # docker's -v: a missing host directory is created.
                os.makedirs(m.source, exist_ok=True)
            elif m.type == "volume":
                try:
                    self.volumes.create(m.source)
                except VolumeError as exc:
                    raise TtrpcError(Code.INVALID_ARGUMENT, str(exc)) from exc
            elif m.type == "tmpfs":
                _check_tmpfs_options(m.options)
            else:
                raise TtrpcError(Code.INVALID_ARGUMENT, f"unknown mount type {m.type!r}")
            found.append(
                UserMount(
                    type=m.type,
                    source=m.source,
                    destination=dest,
                    readonly=m.readonly,
                    options=m.options,
                )
            )
        return found

    def _spec_mounts(self, rec: ContainerRecord) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for m in rec.mounts:
            if m.type == "tmpfs":
                opts = [o for o in m.options.split(",") if o]
                out.append(ocispec.tmpfs_mount(m.destination, opts + ["ro"] * m.readonly))
            else:
                source = m.source if m.type == "bind" else str(self.volumes.path(m.source))
                out.append(ocispec.bind_mount(source, m.destination, m.readonly))
        return out

    @property
    def _hostport_marker(self) -> Path:
        return self.paths.state_dir / "cni" / "hostport-chains-created"

    def _check_ports(self, cfg: manager_pb2.ContainerConfig, network: str) -> list[PortSpec]:
        ports: list[PortSpec] = []
        if cfg.ports and network != "bridge":
            raise TtrpcError(
                Code.INVALID_ARGUMENT, f"-p needs the bridge network, not --network {network}"
            )
        taken = {
            (p.host_port, p.protocol)
            for c in self.containers.values()
            if not c.removing
            for p in c.record.ports
        }
        for p in cfg.ports:
            proto = p.protocol or "tcp"
            if proto not in ("tcp", "udp"):
                raise TtrpcError(Code.INVALID_ARGUMENT, f"-p: unknown protocol {proto!r}")
            if not (0 < p.host_port < 65536 and 0 < p.container_port < 65536):
                raise TtrpcError(Code.INVALID_ARGUMENT, "-p: ports are 1-65535")
            if (p.host_port, proto) in taken:
                raise TtrpcError(
                    Code.ALREADY_EXISTS,
                    f"host port {p.host_port}/{proto} is already published by another container",
                )
            try:
                cni.check_host_port(p.host_port, proto, p.host_ip)
            except cni.NetworkError as exc:
                raise TtrpcError(Code.ALREADY_EXISTS, str(exc)) from exc
            taken.add((p.host_port, proto))
            ports.append(
                PortSpec(
                    host_port=p.host_port,
                    container_port=p.container_port,
                    protocol=proto,
                    host_ip=p.host_ip,
                )
            )
        return ports

    def _make_netns(self, c: Container) -> None:
        """The namespace, in-process (the bundle's config names it, runc create joins
        it); the record saved before says what to undo."""
        if c.record.cni_config:
            cni.create_netns(self.paths.netns(c.id))

    async def _cni_add(self, c: Container) -> None:
        """CNI ADD into the namespace, and the network's masquerade rule (once)."""
        rec = c.record
        if rec.network != "bridge":
            return
        if rec.ports and not await cni.hostport_chains_exist():
            # portmap is about to create its shared chains: ours to remove when done.
            self._hostport_marker.parent.mkdir(parents=True, exist_ok=True)
            self._hostport_marker.touch()
        add = cni.add(
            rec.cni_config, container_id=c.id, netns=self.paths.netns(c.id), ports=_cni_ports(rec)
        )
        rec.cni_result, _ = await both(add, self._ensure_masquerade())
        rec.ip_address = cni.result_ip(rec.cni_result)
        # Unsynced: DEL needs only the config (host-local releases by container id);
        # after a reboot the veth is gone with the namespace.
        self.store.save(rec, durable=False)

    async def _ensure_masquerade(self) -> None:
        """Once per pyshimd: every ADD waits for the first one's check."""
        if self._masquerade is None:
            self._masquerade = asyncio.ensure_future(cni.ensure_masquerade(self.network))
        try:
            await asyncio.shield(self._masquerade)
        except BaseException:
            if self._masquerade.done():
                self._masquerade = None  # the next container tries again
            raise

    async def _release_network(self, c: Container) -> None:
        rec = c.record
        netns = self.paths.netns(c.id)
        if rec.cni_config:
            try:
                await cni.delete(
                    rec.cni_config,
                    container_id=c.id,
                    netns=netns,
                    ports=_cni_ports(rec),
                    result=rec.cni_result,
                )
            except cni.NetworkError as exc:
                log.warning("container %s: releasing its network: %s", c.id, exc)
        if rec.ports and self._hostport_marker.exists():
            others = any(
                o.record.ports for o in self.containers.values() if o is not c and not o.removing
            )
            if not others and await cni.prune_hostport_chains():
                self._hostport_marker.unlink()
                log.info("removed portmap's chains (no port is published any more)")
        try:
            cni.remove_netns(netns)
        except cni.NetworkError as exc:
            log.warning("container %s: %s", c.id, exc)

    async def _create_and_start(self, c: Container, cfg: manager_pb2.ContainerConfig) -> None:
        if c.record.network == "bridge":
            c.record.cni_config = self.network.conflist(ports=bool(c.record.ports))
        # Before anything is made: what to undo after a crash (files, namespace, CNI,
        # the shim). The one save of `run --rm` that is synced (records.py: the first
        # save, durable, also puts the container's directory durably in place).
        self.store.save(c.record)
        self._make_netns(c)
        self._prepare_bundle(c, cfg)
        # Unsynced: what the image resolved to. Kept containers have it synced before
        # Run answers (_mark_started); a --rm one is removed at recovery without it.
        self.store.save(c.record, durable=False)
        tty_size = (cfg.tty_width, cfg.tty_height)
        # CNI ADD runs while the shim starts and runc creates the container: runc's init
        # waits on its exec fifo until Start, so the container's process runs only once
        # both are done. On failure both have finished (nothing in flight) before run's
        # teardown undoes them.
        await both(self._cni_add(c), self._create(c, tty_size))
        await self._start_created(c)

    async def _launch(
        self, c: Container, tty_size: tuple[int, int] = (0, 0), checkpoint: str = ""
    ) -> None:
        """A new shim for the prepared bundle: start, Create, Start, and watch it.

        With ``checkpoint`` (a CRIU image directory) Start restores it instead."""
        await self._create(c, tty_size, checkpoint)
        await self._start_created(c, checkpoint)

    async def _create(self, c: Container, tty_size: tuple[int, int], checkpoint: str = "") -> None:
        """The shim's `start`, then Create: runc create, the init not yet running."""
        cid = c.id
        rec = c.record
        bundle = Path(rec.bundle)
        mounts = [
            mount_pb2.Mount(type=m.type, source=m.source, options=m.options)
            for m in rec.rootfs_mounts
        ]
        if c.relay is None:
            c.relay = LogRelay(cid, make_log_fifo(bundle))
        if self.log_index is not None:
            self.log_index.watch(self.paths.log(cid))
        rec.started_at_ns = _now_ns()
        # containerd gives every task's bundle a fresh `work` dir (linked there): the
        # shims' CRIU work paths default to it, and runc makes only their last part.
        (bundle / "work").mkdir(mode=0o700, exist_ok=True)
        address = await self.launcher.start(cid, bundle)
        # Not saved here: the save at Start carries it, and until then recovery reads
        # the same address from the bundle's `address` file (the shim wrote it there).
        c.record.shim_address = address
        c.client = await ShimClient.dial(address, fresh=True)
        conn = await c.client.connect(cid)
        c.record.shim_pid = conn.shim_pid
        options = options_pb2.Options(root=str(self.paths.runc_root), binary_name=self.runc_binary)
        out = _file_uri(self.paths.log(cid))
        req = shim_pb2.CreateTaskRequest(
            id=cid,
            bundle=str(bundle),
            rootfs=mounts,
            terminal=rec.terminal,
            stdin=str(self.paths.fifo_dir(cid) / "stdin") if rec.stdin else "",
            stdout=out,
            stderr="" if rec.terminal else out,
            options=anyutil.pack(options),
            checkpoint=checkpoint,
        )
        created = await c.client.create(req)
        # Saved with the status once started (a reconnect asks the shim for it anyway).
        c.record.pid = created.pid
        if rec.terminal and all(tty_size):
            await c.client.resize(cid, "", *tty_size)

    async def _start_created(self, c: Container, checkpoint: str = "") -> None:
        assert c.client is not None
        if checkpoint:
            started = await c.client.start(c.id, timeout=CHECKPOINT_TIMEOUT)
            # A restore's init is known only now (Create answers 0).
            c.record.pid = started.pid
            self.store.save(c.record)
        else:
            await c.client.start(c.id)
        self._mark_started(c)
        c.monitor = asyncio.create_task(self._monitor(c))

    def _mark_started(self, c: Container) -> None:
        """Start succeeded: the container runs, unless its init's /tasks/exit was handled
        first (it comes on the shim's event connection and can overtake Start's reply)."""
        if not c.record.exited:
            c.record.status = "running"
            # Before Run answers. Synced for a kept container (after a reboot `ps -a`
            # shows what it ran); for --rm a snapshot: recovery finds the shim by the
            # bundle's address, asks it the pid and status, and removes the container.
            self.store.save(c.record, durable=not c.record.auto_remove)

    # ------------------------------------------------------------------ teardown

    async def _teardown(self, c: Container) -> None:
        """Best effort, every step: delete the task, stop the shim, remove every trace."""
        c.removing = True
        if c.restart_task is not None:
            c.restart_task.cancel()
        # The network's DEL needs nothing of the shim's: both at once.
        await both(self._release_shim(c), self._release_network(c))
        if self.log_index is not None:
            self.log_index.unwatch(self.paths.log(c.id))
        if c.relay is not None:
            c.relay.close()
            c.relay = None
        self._remove_files(c.id, Path(c.record.bundle), self.store.retire(c.id))
        self.containers.pop(c.id, None)
        c.exited.set()

    def _remove_files(self, cid: str, bundle: Path, state: Path | None) -> None:
        """A removed container's bundle, fifos and (retired) state directory."""
        _unmount_all(bundle / "rootfs")
        for path in (bundle, self.paths.fifo_dir(cid), state):
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)

    async def _release_shim(self, c: Container) -> None:
        """Delete the task and stop its shim (by ttrpc, else by the shim's own delete)."""
        if c.monitor is not None:
            c.monitor.cancel()
            c.monitor = None
        client = c.client
        shim_done = c.record.shim_gone or not c.record.shim_address
        clean = False
        if client is not None and not client.closed:
            shim_done, clean = await _stop_shim(client, c.id)
            client.close()
        c.client = None
        # After a clean Delete + Shutdown there is nothing left for the shim's `delete`
        # (containerd does not run it then either): one process start saved per rm.
        if not clean and (not shim_done or Path(c.record.bundle, "address").exists()):
            # The shim's own cleanup for whatever the RPCs could not do (runc state,
            # rootfs mounts); harmless when they already did.
            try:
                await self.launcher.delete(c.id, Path(c.record.bundle))
            except ShimLaunchError as exc:
                log.warning("container %s: shim delete: %s", c.id, exc)
            if not shim_done:
                _stop_shim_processes(c.id, str(self.paths.socket))
        _unmount_all(Path(c.record.bundle) / "rootfs")

    async def remove(self, ref: str, force: bool) -> None:
        c = self.lookup(ref)
        if c.removing:
            return
        if not c.record.exited and not c.record.shim_gone:
            if not force:
                raise TtrpcError(
                    Code.FAILED_PRECONDITION,
                    f"container {c.record.name} is running: stop it with "
                    f"`pyshim kill {c.record.name}` or use `pyshim rm -f {c.record.name}`",
                )
            if c.client is not None:
                with contextlib.suppress(TtrpcError):
                    await c.client.kill(c.id, 9, all=True)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FORCE_KILL_WAIT):
                        await c.exited.wait()
        async with c.lock:
            await self._teardown(c)
        log.info("container %s removed", c.id)

    # ------------------------------------------------------------------ stop / start

    def _cancel_restart(self, c: Container) -> None:
        if c.restart_task is not None:
            c.restart_task.cancel()
            c.restart_task = None

    async def stop(self, ref: str, timeout: float | None) -> None:
        """The stop signal, then SIGKILL after ``timeout``; no policy restarts it after."""
        c = self.lookup(ref)
        rec = c.record
        rec.manually_stopped = True
        self._cancel_restart(c)
        if c.lock.locked():
            # A policy restart past its back-off may be launching the shim now (no exit
            # and no client yet): let it finish, then stop what it started.
            async with c.lock:
                pass
        if c.removing:
            raise _not_found(ref)
        if rec.exited or rec.shim_gone:
            if rec.status == "restarting":
                rec.status = "stopped"
            self.store.save(rec)
            return
        self.store.save(rec)
        client = self._client(c)
        grace = DEFAULT_STOP_TIMEOUT if timeout is None else max(0.0, timeout)
        exited = c.exited
        with contextlib.suppress(TtrpcError):
            await client.kill(c.id, rec.stop_signal)
            if rec.status == "paused":
                # A frozen process cannot act on the signal; let it, as docker does.
                await client.resume(c.id)
                rec.status = "running"
        try:
            async with asyncio.timeout(grace):
                await exited.wait()
            return
        except TimeoutError:
            log.info("container %s: no exit %.0fs after the stop signal; SIGKILL", c.id, grace)
        with contextlib.suppress(TtrpcError):
            await client.kill(c.id, int(signal.SIGKILL), all=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FORCE_KILL_WAIT):
                await exited.wait()
        if not exited.is_set():
            raise TtrpcError(
                Code.DEADLINE_EXCEEDED, f"container {rec.name} did not exit after SIGKILL"
            )

    async def start(self, ref: str, checkpoint: str = "") -> Container:
        """A stopped container runs again: same id, same log, same writable layer.

        With ``checkpoint`` (`pyshim checkpoint`'s output) it continues where that
        checkpoint left it, instead of running its command anew."""
        c = self.lookup(ref)
        rec = c.record
        if checkpoint:
            _check_checkpoint_dir(checkpoint)
        if c.removing:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {rec.name} is being removed")
        if not rec.exited:
            raise TtrpcError(
                Code.FAILED_PRECONDITION, f"container {rec.name} is already {rec.status}"
            )
        self._cancel_restart(c)
        rec.manually_stopped = False
        rec.restart_count = 0
        c.restart_delay = RESTART_FIRST_DELAY
        try:
            await self._start_again(c, checkpoint)
        except TtrpcError as exc:
            raise TtrpcError(exc.code, f"cannot start {rec.name}: {exc.message}") from exc
        except (ShimLaunchError, OSError, ocispec.SpecError) as exc:
            raise TtrpcError(Code.UNKNOWN, f"cannot start {rec.name}: {exc}") from exc
        return c

    async def restart(self, ref: str, timeout: float | None) -> Container:
        await self.stop(ref, timeout)
        return await self.start(ref)

    async def _start_again(self, c: Container, checkpoint: str = "") -> None:
        """Tear down the old run's shim, then launch a new one on the same bundle."""
        async with c.lock:
            if c.removing:
                raise TtrpcError(Code.FAILED_PRECONDITION, "the container is being removed")
            if not c.record.exited:
                return  # started by someone else meanwhile
            await self._release_shim(c)
            if not os.path.isdir(c.record.bundle):
                await self._remake_after_reboot(c)
            _clear_bundle(Path(c.record.bundle))
            rec = c.record
            rec.exit_status = None
            rec.exited_at_ns = 0
            rec.exit_reason = ""
            rec.oom_killed = False
            rec.shim_gone = False
            rec.shim_address = ""
            rec.shim_pid = 0
            rec.pid = 0
            rec.status = "created"
            c.exited = asyncio.Event()
            self.store.save(rec)
            try:
                await self._launch(c, checkpoint=checkpoint)
            except BaseException as exc:
                await self._release_shim(c)
                rec.shim_gone = True
                self.record_exit(c, 255, 0, f"start failed: {exc}")
                raise
        log.info("container %s started again%s", c.id, f" from {checkpoint}" * bool(checkpoint))

    async def checkpoint(self, ref: str, output: str, leave_running: bool) -> None:
        """CRIU's images of a running (or paused) container into ``output``; unless
        ``leave_running`` the container stops, as if stopped by hand (no restart)."""
        c = self._running(ref)
        rec = c.record
        if not os.path.isabs(output):
            raise TtrpcError(Code.INVALID_ARGUMENT, f"--output {output!r}: must be absolute")
        made = not os.path.exists(output)
        if not made and (not os.path.isdir(output) or os.listdir(output)):
            raise TtrpcError(
                Code.ALREADY_EXISTS, f"--output {output}: exists and is not an empty directory"
            )
        os.makedirs(output, mode=0o700, exist_ok=True)
        if not leave_running:
            rec.manually_stopped = True
            self._cancel_restart(c)
            self.store.save(rec)
        try:
            await self._client(c).checkpoint(
                c.id, output, exit=not leave_running, terminal=rec.terminal
            )
        except BaseException as exc:
            if made:
                shutil.rmtree(output, ignore_errors=True)
            if not leave_running:
                rec.manually_stopped = False
                self.store.save(rec)
            if isinstance(exc, TtrpcError):
                raise TtrpcError(exc.code, f"cannot checkpoint {rec.name}: {exc.message}") from exc
            raise
        log.info("container %s checkpointed to %s", c.id, output)
        if leave_running:
            return
        # CRIU killed it once dumped: answer once its exit is recorded.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FORCE_KILL_WAIT):
                await c.exited.wait()
        if rec.exited and not rec.exit_reason:
            rec.exit_reason = f"checkpointed to {output}"
            self.store.save(rec)

    async def pause(self, ref: str) -> None:
        c = self.lookup(ref)
        if c.record.status != "running":
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {c.record.name} is not running")
        await self._client(c).pause(c.id)
        c.record.status = "paused"
        self.store.save(c.record)

    async def unpause(self, ref: str) -> None:
        c = self.lookup(ref)
        if c.record.status != "paused":
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {c.record.name} is not paused")
        await self._client(c).resume(c.id)
        c.record.status = "running"
        self.store.save(c.record)

    # ------------------------------------------------------------------ stats / top

    def _running(self, ref: str) -> Container:
        c = self.lookup(ref)
        if c.record.status not in ("running", "paused"):
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {c.record.name} is not running")
        return c

    async def stats(self, refs: list[str]) -> list[manager_pb2.ContainerStats]:
        if refs:
            targets = [self._running(r) for r in refs]
        else:
            targets = [
                c for c in self.containers_list(False) if c.record.status in ("running", "paused")
            ]

        async def one(c: Container) -> manager_pb2.ContainerStats:
            resp = await self._client(c).stats(c.id)
            try:
                u = metrics.usage(resp.stats)
            except ValueError as exc:
                raise TtrpcError(Code.INTERNAL, f"container {c.record.name}: {exc}") from exc
            rx, tx = metrics.net_io(c.record.pid)
            out = manager_pb2.ContainerStats(
                id=c.id,
                name=c.record.name,
                cpu_usage_ns=u.cpu_ns,
                memory_usage=u.memory,
                memory_limit=u.memory_limit,
                pids=u.pids,
                net_rx_bytes=rx,
                net_tx_bytes=tx,
            )
            out.read_at.CopyFrom(timeutil.timestamp_now())
            return out

        return list(await asyncio.gather(*(one(c) for c in targets)))

    async def top(self, ref: str) -> list[metrics.ProcessRow]:
        c = self._running(ref)
        resp = await self._client(c).pids(c.id)
        rows = [metrics.process_row(p.pid) for p in resp.processes]
        return sorted((r for r in rows if r is not None), key=lambda r: r.pid)

    # ------------------------------------------------------------------ process control

    def _client(self, c: Container) -> ShimClient:
        if c.client is None or c.client.closed:
            raise TtrpcError(
                Code.FAILED_PRECONDITION,
                f"container {c.record.name} has no running shim "
                f"({c.record.exit_reason or c.record.status})",
            )
        return c.client

    async def kill(self, ref: str, signal: int, exec_id: str, all: bool) -> None:
        c = self.lookup(ref)
        if not exec_id and c.record.exited:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {c.record.name} is not running")
        try:
            await self._client(c).kill(c.id, signal, exec_id=exec_id, all=all)
        except TtrpcError as exc:
            if exc.code == Code.NOT_FOUND:
                raise TtrpcError(
                    Code.FAILED_PRECONDITION, f"container {c.record.name}: {exc.message}"
                ) from exc
            raise

    async def wait(self, ref: str, exec_id: str) -> tuple[int, int, str]:
        c = self.lookup(ref)
        if exec_id:
            resp = await self._exec_wait(c, exec_id)
            return resp.exit_status, timeutil.ns_from_timestamp(resp.exited_at), ""
        await c.exited.wait()
        rec = c.record
        if rec.exit_status is None:
            raise TtrpcError(Code.NOT_FOUND, f"container {rec.name} was removed")
        return rec.exit_status, rec.exited_at_ns, rec.exit_reason

    def _exec_wait(self, c: Container, exec_id: str) -> asyncio.Task[shim_pb2.WaitResponse]:
        task = c.exec_waits.get(exec_id)
        if task is None:
            task = asyncio.create_task(self._wait_and_delete_exec(c, exec_id))
            c.exec_waits[exec_id] = task
        return task

    async def _wait_and_delete_exec(self, c: Container, exec_id: str) -> shim_pb2.WaitResponse:
        client = self._client(c)
        resp = await client.wait(c.id, exec_id)
        # The shim keeps an exited exec until it is deleted; nobody else will.
        with contextlib.suppress(TtrpcError):
            await client.delete(c.id, exec_id)
        return resp

    async def exec(self, req: manager_pb2.ExecRequest) -> manager_pb2.ExecResponse:
        c = self.lookup(req.container)
        if c.record.exited:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {c.record.name} is not running")
        client = self._client(c)
        exec_id = "e" + secrets.token_hex(6)
        cfg = json.loads(Path(c.record.bundle, "config.json").read_text())
        base = cfg.get("process", {})
        try:
            proc = ocispec.process_spec(
                ocispec.ProcessOptions(
                    args=list(req.args),
                    env=ocispec.merge_env(base.get("env", []), list(req.env)),
                    workdir=req.workdir or base.get("cwd", "/"),
                    user=req.user or _user_text(base.get("user", {})),
                    terminal=req.terminal,
                    console_size=(req.tty_width, req.tty_height),
                )
            )
        except ocispec.SpecError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, str(exc)) from exc
        if not req.args:
            raise TtrpcError(Code.INVALID_ARGUMENT, "exec needs a command")
        out = self.paths.exec_log(c.id, exec_id)
        out.touch(mode=0o640)
        stdin = ""
        if req.stdin:
            stdin = str(self.paths.fifo_dir(c.id) / f"{exec_id}-stdin")
            Path(stdin).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.mkfifo(stdin, 0o600)
        any_spec = any_pb2.Any(type_url=PROCESS_SPEC_URL, value=json.dumps(proc).encode())
        await client.exec(
            shim_pb2.ExecProcessRequest(
                id=c.id,
                exec_id=exec_id,
                terminal=req.terminal,
                stdin=stdin,
                stdout=_file_uri(out),
                stderr="" if req.terminal else _file_uri(out),
                spec=any_spec,
            )
        )
        try:
            started = await client.start(c.id, exec_id)
        except TtrpcError:
            with contextlib.suppress(TtrpcError):
                await client.delete(c.id, exec_id)
            raise
        return manager_pb2.ExecResponse(
            container_id=c.id, exec_id=exec_id, pid=started.pid, log_path=str(out), stdin_path=stdin
        )

    async def resize(self, ref: str, exec_id: str, width: int, height: int) -> None:
        c = self.lookup(ref)
        await self._client(c).resize(c.id, exec_id, width, height)

    async def close_io(self, ref: str, exec_id: str) -> None:
        c = self.lookup(ref)
        await self._client(c).close_io(c.id, exec_id)

    # ------------------------------------------------------------------ restart

    async def recover(self) -> None:
        for cid, state in self.store.abandoned():
            log.info("container %s: removing what a crash left of it", cid)
            self._remove_files(cid, self.paths.bundle(cid), state)
        records, problems = self.store.load_all()
        for problem in problems:
            log.error("skipping container: %s", problem)
        for rec in records:
            c = Container(rec)
            if rec.exited:
                c.exited.set()
            self.containers[rec.id] = c
            if self.log_index is not None and not rec.exited:
                self.log_index.watch(self.paths.log(rec.id))
        await asyncio.gather(*(self._reconnect(c) for c in list(self.containers.values())))
        for c in list(self.containers.values()):
            rec = c.record
            if rec.exited and rec.auto_remove:
                self._spawn(self._auto_remove(c))
            elif rec.exited and rec.restart_policy == "always" and rec.manually_stopped:
                # docker: `always` brings back even a stopped container when the daemon
                # starts; `unless-stopped` is the one that stays stopped.
                rec.manually_stopped = False
                self._schedule_restart(c)
            elif rec.exited and wants_restart(rec):
                self._schedule_restart(c)

    async def _reconnect(self, c: Container) -> None:
        rec = c.record
        if rec.shim_gone:
            return
        bundle = Path(rec.bundle)
        address = rec.shim_address
        if not address:
            with contextlib.suppress(OSError):
                address = (bundle / "address").read_text().strip()
        if not address:
            # pyshimd died before the shim was started; nothing can be running.
            rec.shim_gone = True
            self.record_exit(c, 255, 0, "pyshimd stopped while creating the container")
            return
        if (bundle / "log").exists():
            try:
                c.relay = LogRelay(c.id, make_log_fifo(bundle))
            except OSError as exc:
                log.warning("container %s: shim log: %s", c.id, exc)
        try:
            c.client = await ShimClient.dial(address)
            conn = await c.client.connect(c.id)
            state = await c.client.state(c.id)
        except (OSError, TtrpcError) as exc:
            await self._shim_lost(c, f"its shim is gone ({exc})")
            return
        rec.shim_pid = conn.shim_pid
        if state.status == task_pb2.STOPPED:
            self.record_exit(c, state.exit_status, timeutil.ns_from_timestamp(state.exited_at))
        elif state.status in (task_pb2.RUNNING, task_pb2.PAUSED, task_pb2.PAUSING):
            rec.status = "running" if state.status == task_pb2.RUNNING else "paused"
            rec.pid = state.pid
            self.store.save(rec)
        else:
            rec.status = task_pb2.Status.Name(state.status).lower()
            self.store.save(rec)
        log.info("reconnected to container %s (%s)", c.id, rec.status)
        if not rec.exited:
            c.monitor = asyncio.create_task(self._monitor(c))
        else:
            # A later connection drop must not be taken for a death.
            c.monitor = asyncio.create_task(self._watch_stopped(c))

    async def _watch_stopped(self, c: Container) -> None:
        client = c.client
        assert client is not None
        with contextlib.suppress(TtrpcError):
            await client.wait_closed()
        if not c.removing:
            c.record.shim_gone = True
            self.store.save(c.record)

    async def close(self) -> None:
        """pyshimd stopping: let go of shims, never stop them (containers outlive us)."""
        for c in self.containers.values():
            c.removing = True
            if c.restart_task is not None:
                c.restart_task.cancel()
            if c.monitor is not None:
                c.monitor.cancel()
            if c.client is not None:
                c.client.close()
            if c.relay is not None:
                c.relay.close()
        for task in list(self._tasks):
            task.cancel()
        if self.log_index is not None:
            self.log_index.close()
        if not any(c.record.network == "bridge" for c in self.containers.values()):
            # Nothing on the bridge any more: the network's rule goes with pyshimd (a
            # container that outlives pyshimd keeps it; the next pyshimd finds it).
            try:
                await cni.remove_masquerade(self.network)
            except (cni.NetworkError, OSError) as exc:
                log.warning("%s", exc)


async def both(first: Awaitable[T], second: Awaitable[U]) -> tuple[T, U]:
    """Both to the end, at once; then the first error, if any. Unlike gather or a
    TaskGroup, a failure of one never cancels the other: what it started (a shim, a
    CNI plugin) must be known to the teardown that follows, not left half-done."""
    tasks = (asyncio.ensure_future(first), asyncio.ensure_future(second))
    try:
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks)
        raise
    for t in tasks:
        if not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    return tasks[0].result(), tasks[1].result()


async def _delete_task(client: ShimClient, cid: str) -> None:
    """Delete the init; if the shim says it still runs (our record can be ahead of it,
    e.g. an exit event that was not the process's), kill it and try once more."""
    try:
        await client.delete(cid)
        return
    except ConnectionClosedError:
        raise
    except TtrpcError as exc:
        if exc.code == Code.NOT_FOUND:
            return
    with contextlib.suppress(TtrpcError):
        await client.kill(cid, 9, all=True)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(FORCE_KILL_WAIT):
            await client.wait(cid)
    await client.delete(cid)


async def _stop_shim(client: ShimClient, cid: str) -> tuple[bool, bool]:
    """Delete + Shutdown as containerd does: (the shim has gone away, and the task was
    deleted first)."""
    deleted = True
    try:
        await _delete_task(client, cid)
    except ConnectionClosedError:
        return False, False
    except TtrpcError as exc:
        log.warning("container %s: Delete: %s", cid, exc)
        deleted = False
    with contextlib.suppress(TtrpcError):
        await client.shutdown(cid)
    try:
        async with asyncio.timeout(SHIM_EXIT_WAIT):
            await client.wait_closed()
    except TimeoutError:
        return False, False
    return True, deleted


def _stop_shim_processes(container_id: str, manager_address: str) -> None:
    """SIGKILL the shim daemon we started for this container when it could not be shut
    down over ttrpc (it may never have answered, so its pid may be unknown): found by its
    argv, which names both the container and this manager's socket."""
    want = {b"-id", container_id.encode(), b"-address", manager_address.encode()}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not any(b"containerd-shim-pyshim" in a for a in argv[:2]):
            continue
        # The long-lived daemon has no action word; start/delete finish on their own.
        if not want.issubset(argv) or b"start" in argv or b"delete" in argv:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(entry.name), 9)
            log.warning("container %s: killed its unresponsive shim %s", container_id, entry.name)


# What the manager itself puts in a bundle; everything else there is the last shim's.
_BUNDLE_OWN = frozenset({"config.json", "rootfs", "log"})


def _write_bundle(bundle: Path, spec: dict[str, Any], links: Sequence[tuple[str, str]]) -> None:
    bundle.mkdir(parents=True, exist_ok=True, mode=0o711)
    (bundle / "rootfs").mkdir(exist_ok=True, mode=0o711)
    for name, target in links:
        (bundle / "rootfs" / name.lstrip("/")).symlink_to(target)
    (bundle / "config.json").write_text(json.dumps(spec, indent=2))


def _clear_bundle(bundle: Path) -> None:
    """Leave the bundle as a new one, before a new shim starts in it: containerd gives
    every task a fresh bundle, and a shim finding its predecessor's state there takes the
    deleted container for one to recover."""
    for entry in os.scandir(bundle):
        if entry.name in _BUNDLE_OWN:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def _user_text(user: dict[str, object]) -> str:
    return f"{user.get('uid', 0)}:{user.get('gid', 0)}"


def _unmount_all(target: Path) -> None:
    if not target.exists():
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(16):
        if not os.path.ismount(target):
            return
        if libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
            log.warning("unmounting %s: %s", target, os.strerror(ctypes.get_errno()))
            return


def container_message(c: Container, paths: Paths) -> manager_pb2.Container:
    rec = c.record
    msg = manager_pb2.Container(
        id=rec.id,
        name=rec.name,
        status=rec.status,
        pid=rec.pid,
        exited=rec.exited,
        exit_status=rec.exit_status or 0,
        command=rec.command,
        image=rec.image,
        bundle=rec.bundle,
        shim_address=rec.shim_address,
        terminal=rec.terminal,
        exit_reason=rec.exit_reason,
        auto_remove=rec.auto_remove,
        shim_pid=rec.shim_pid,
        restart_policy=policy_text(rec),
        restart_count=rec.restart_count,
        oom_killed=rec.oom_killed,
        network=rec.network,
        ip_address=rec.ip_address,
        ports=[
            manager_pb2.PortMapping(
                host_port=p.host_port,
                container_port=p.container_port,
                protocol=p.protocol,
                host_ip=p.host_ip,
            )
            for p in rec.ports
        ],
        mounts=[
            manager_pb2.MountRequest(
                type=m.type,
                source=m.source,
                destination=m.destination,
                readonly=m.readonly,
                options=m.options,
            )
            for m in rec.mounts
        ],
        log_path=str(paths.log(rec.id)),
        stdin_path=str(paths.fifo_dir(rec.id) / "stdin") if rec.stdin else "",
    )
    msg.created_at.CopyFrom(timeutil.timestamp_from_ns(rec.created_at_ns))
    if rec.started_at_ns:
        msg.started_at.CopyFrom(timeutil.timestamp_from_ns(rec.started_at_ns))
    if rec.exited:
        msg.exited_at.CopyFrom(timeutil.timestamp_from_ns(rec.exited_at_ns))
    return msg


_TMPFS_FLAGS = frozenset({"ro", "rw", "exec", "noexec", "suid", "nosuid", "dev", "nodev"})


def _check_tmpfs_options(options: str) -> None:
    """--tmpfs /dir:size=64m,mode=1777,noexec: what the kernel takes, checked first so
    a typo is an error here rather than runc's."""
    for opt in filter(None, options.split(",")):
        key, sep, value = opt.partition("=")
        try:
            if key == "size" and sep:
                units.parse_size(value)
            elif key == "mode" and sep:
                int(value, 8)
            elif key in ("uid", "gid") and sep:
                int(value)
            elif sep or key not in _TMPFS_FLAGS:
                raise ValueError(f"unknown option {opt!r}")
        except ValueError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"--tmpfs: {exc}") from None


def _cni_ports(rec: ContainerRecord) -> list[dict[str, Any]]:
    """portmap's runtimeConfig.portMappings."""
    return [
        {
            "hostPort": p.host_port,
            "containerPort": p.container_port,
            "protocol": p.protocol,
            **({"hostIP": p.host_ip} if p.host_ip else {}),
        }
        for p in rec.ports
    ]


def policy_text(rec: ContainerRecord) -> str:
    if rec.restart_policy == "on-failure" and rec.restart_max:
        return f"on-failure:{rec.restart_max}"
    return rec.restart_policy
