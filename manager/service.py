"""pyshimd's ttrpc services: the Manager API for the CLI and the Events sink for shims.

Thin: each handler maps a request onto the Supervisor or the ImageStore.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import json
import logging
from pathlib import Path

from google.protobuf import empty_pb2, json_format
from google.protobuf.message import Message

from manager.apiclient import MANAGER_SERVICE
from manager.images import ImageEntry, ImageError, ImageNotFound, ImageStore
from manager.pulls import Puller
from manager.supervisor import Supervisor, container_message
from manager.volumes import VolumeError, VolumeInfo, VolumeNotFound
from protocol.proto import anyutil, timeutil
from protocol.proto.events import forward_pb2
from protocol.proto.events import task_pb2 as events_pb2
from protocol.proto.manager.v1 import manager_pb2 as pb
from protocol.ttrpc.server import Method, RequestContext, Server
from protocol.ttrpc.status import Code, TtrpcError

log = logging.getLogger("pyshimd")

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
SEEN_EXITS_MAX = 4096


def _image_message(entry: ImageEntry) -> pb.Image:
    return pb.Image(
        ref=entry.ref,
        digest=entry.digest,
        layers=entry.layers,
        size=entry.size,
        config_json=json.dumps(entry.config),
    )


def _image_error(exc: ImageError) -> TtrpcError:
    code = Code.NOT_FOUND if isinstance(exc, ImageNotFound) else Code.FAILED_PRECONDITION
    return TtrpcError(code, str(exc))


def _timeout(req: pb.StopRequest) -> float | None:
    return None if req.timeout_seconds < 0 else float(req.timeout_seconds)


class ManagerService:
    def __init__(self, supervisor: Supervisor, images: ImageStore, puller: Puller) -> None:
        self.sup = supervisor
        self.images = images
        self.puller = puller

    async def run(self, ctx: RequestContext, req: pb.RunRequest) -> pb.RunResponse:
        if not req.config.args and not req.config.image:
            raise TtrpcError(Code.INVALID_ARGUMENT, "no command given")
        try:
            c = await self.sup.run(req.config)
        except ImageError as exc:
            raise _image_error(exc) from exc
        return pb.RunResponse(container=container_message(c, self.sup.paths))

    async def exec(self, ctx: RequestContext, req: pb.ExecRequest) -> pb.ExecResponse:
        return await self.sup.exec(req)

    async def kill(self, ctx: RequestContext, req: pb.KillRequest) -> empty_pb2.Empty:
        await self.sup.kill(req.container, req.signal or 15, req.exec_id, req.all)
        return empty_pb2.Empty()

    async def wait(self, ctx: RequestContext, req: pb.WaitRequest) -> pb.WaitResponse:
        status, at_ns, reason = await self.sup.wait(req.container, req.exec_id)
        resp = pb.WaitResponse(exit_status=status, exit_reason=reason)
        resp.exited_at.CopyFrom(timeutil.timestamp_from_ns(at_ns))
        return resp

    async def remove(self, ctx: RequestContext, req: pb.RemoveRequest) -> empty_pb2.Empty:
        await self.sup.remove(req.container, req.force)
        return empty_pb2.Empty()

    async def list(self, ctx: RequestContext, req: pb.ListRequest) -> pb.ListResponse:
        found = self.sup.containers_list(req.all)
        return pb.ListResponse(containers=[container_message(c, self.sup.paths) for c in found])

    async def inspect(self, ctx: RequestContext, req: pb.InspectRequest) -> pb.InspectResponse:
        c = self.sup.lookup(req.container)
        try:
            spec = Path(c.record.bundle, "config.json").read_text()
        except OSError:
            spec = ""
        return pb.InspectResponse(container=container_message(c, self.sup.paths), spec_json=spec)

    async def resize(self, ctx: RequestContext, req: pb.ResizeRequest) -> empty_pb2.Empty:
        await self.sup.resize(req.container, req.exec_id, req.width, req.height)
        return empty_pb2.Empty()

    async def close_io(self, ctx: RequestContext, req: pb.CloseIORequest) -> empty_pb2.Empty:
        await self.sup.close_io(req.container, req.exec_id)
        return empty_pb2.Empty()

    async def image_import(
        self, ctx: RequestContext, req: pb.ImageImportRequest
    ) -> pb.ImageImportResponse:
        path = Path(req.archive_path)
        if not path.is_absolute():
            raise TtrpcError(Code.INVALID_ARGUMENT, "archive path must be absolute")
        try:
            # Unpacking is disk-bound and long; the loop keeps serving meanwhile.
            entries = await asyncio.to_thread(self.images.import_archive, path, req.ref)
        except ImageError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, str(exc)) from exc
        return pb.ImageImportResponse(images=[_image_message(e) for e in entries])

    async def image_list(
        self, ctx: RequestContext, req: pb.ImageListRequest
    ) -> pb.ImageListResponse:
        return pb.ImageListResponse(images=[_image_message(e) for e in self.images.list()])

    async def image_remove(
        self, ctx: RequestContext, req: pb.ImageRemoveRequest
    ) -> empty_pb2.Empty:
        in_use = {c.record.image for c in self.sup.containers.values() if c.record.image}
        try:
            self.images.remove(req.ref, in_use)
        except ImageError as exc:
            raise _image_error(exc) from exc
        return empty_pb2.Empty()

    async def stop(self, ctx: RequestContext, req: pb.StopRequest) -> empty_pb2.Empty:
        await self.sup.stop(req.container, _timeout(req))
        return empty_pb2.Empty()

    async def start(self, ctx: RequestContext, req: pb.StartRequest) -> pb.StartResponse:
        c = await self.sup.start(req.container, req.checkpoint)
        return pb.StartResponse(container=container_message(c, self.sup.paths))

    async def checkpoint(self, ctx: RequestContext, req: pb.CheckpointRequest) -> empty_pb2.Empty:
        await self.sup.checkpoint(req.container, req.output, req.leave_running)
        return empty_pb2.Empty()

    async def restart(self, ctx: RequestContext, req: pb.StopRequest) -> pb.StartResponse:
        c = await self.sup.restart(req.container, _timeout(req))
        return pb.StartResponse(container=container_message(c, self.sup.paths))

    async def pause(self, ctx: RequestContext, req: pb.PauseRequest) -> empty_pb2.Empty:
        await self.sup.pause(req.container)
        return empty_pb2.Empty()

    async def unpause(self, ctx: RequestContext, req: pb.PauseRequest) -> empty_pb2.Empty:
        await self.sup.unpause(req.container)
        return empty_pb2.Empty()

    async def stats(self, ctx: RequestContext, req: pb.StatsRequest) -> pb.StatsResponse:
        return pb.StatsResponse(stats=await self.sup.stats(list(req.containers)))

    async def top(self, ctx: RequestContext, req: pb.TopRequest) -> pb.TopResponse:
        rows = await self.sup.top(req.container)
        return pb.TopResponse(
            processes=[
                pb.TopProcess(pid=r.pid, ppid=r.ppid, user=r.user, command=r.command) for r in rows
            ]
        )

    async def pull(self, ctx: RequestContext, req: pb.PullRequest) -> pb.PullResponse:
        try:
            entry = await self.puller.pull(req.ref)
        except ImageError as exc:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"pull {req.ref}: {exc}") from exc
        except OSError as exc:
            raise TtrpcError(Code.UNKNOWN, f"pull {req.ref}: {exc}") from exc
        return pb.PullResponse(image=_image_message(entry))

    async def pull_progress(
        self, ctx: RequestContext, req: pb.PullProgressRequest
    ) -> pb.PullProgressResponse:
        p = self.puller.progress(req.ref)
        if p is None:
            return pb.PullProgressResponse()
        return pb.PullProgressResponse(
            active=not p.finished,
            layers=[
                pb.LayerProgress(digest=lp.digest, size=lp.size, done=lp.done, state=lp.state)
                for lp in p.layers
            ],
        )

    async def login(self, ctx: RequestContext, req: pb.LoginRequest) -> empty_pb2.Empty:
        if not req.registry or not req.username:
            raise TtrpcError(Code.INVALID_ARGUMENT, "login needs a registry and a user name")
        try:
            await self.puller.login(req.registry, req.username, req.password)
        except ImageError as exc:
            raise TtrpcError(Code.PERMISSION_DENIED, str(exc)) from exc
        return empty_pb2.Empty()

    def _volume_users(self, name: str) -> builtins.list[str]:
        return sorted(
            c.record.name
            for c in self.sup.containers.values()
            if any(m.type == "volume" and m.source == name for m in c.record.mounts)
        )

    def _volume_message(self, v: VolumeInfo) -> pb.Volume:
        msg = pb.Volume(
            name=v.name, mountpoint=str(v.mountpoint), used_by=self._volume_users(v.name)
        )
        msg.created_at.CopyFrom(timeutil.timestamp_from_ns(v.created_at_ns))
        return msg

    async def volume_create(self, ctx: RequestContext, req: pb.VolumeCreateRequest) -> pb.Volume:
        try:
            info, _ = self.sup.volumes.create(req.name)
        except VolumeError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, str(exc)) from exc
        return self._volume_message(info)

    async def volume_list(
        self, ctx: RequestContext, req: pb.VolumeListRequest
    ) -> pb.VolumeListResponse:
        return pb.VolumeListResponse(
            volumes=[self._volume_message(v) for v in self.sup.volumes.all()]
        )

    async def volume_remove(
        self, ctx: RequestContext, req: pb.VolumeRemoveRequest
    ) -> empty_pb2.Empty:
        try:
            self.sup.volumes.remove(req.name, self._volume_users(req.name))
        except VolumeNotFound as exc:
            raise TtrpcError(Code.NOT_FOUND, str(exc)) from exc
        except VolumeError as exc:
            raise TtrpcError(Code.FAILED_PRECONDITION, str(exc)) from exc
        return empty_pb2.Empty()

    def register(self, server: Server) -> None:
        server.register(
            MANAGER_SERVICE,
            {
                "Run": Method(pb.RunRequest, self.run),
                "Exec": Method(pb.ExecRequest, self.exec),
                "Kill": Method(pb.KillRequest, self.kill),
                "Wait": Method(pb.WaitRequest, self.wait),
                "Remove": Method(pb.RemoveRequest, self.remove),
                "List": Method(pb.ListRequest, self.list),
                "Inspect": Method(pb.InspectRequest, self.inspect),
                "Resize": Method(pb.ResizeRequest, self.resize),
                "CloseIO": Method(pb.CloseIORequest, self.close_io),
                "ImageImport": Method(pb.ImageImportRequest, self.image_import),
                "ImageList": Method(pb.ImageListRequest, self.image_list),
                "ImageRemove": Method(pb.ImageRemoveRequest, self.image_remove),
                "Stop": Method(pb.StopRequest, self.stop),
                "Start": Method(pb.StartRequest, self.start),
                "Restart": Method(pb.StopRequest, self.restart),
                "Pause": Method(pb.PauseRequest, self.pause),
                "Unpause": Method(pb.PauseRequest, self.unpause),
                "Checkpoint": Method(pb.CheckpointRequest, self.checkpoint),
                "Stats": Method(pb.StatsRequest, self.stats),
                "Top": Method(pb.TopRequest, self.top),
                "Pull": Method(pb.PullRequest, self.pull),
                "PullProgress": Method(pb.PullProgressRequest, self.pull_progress),
                "Login": Method(pb.LoginRequest, self.login),
                "VolumeCreate": Method(pb.VolumeCreateRequest, self.volume_create),
                "VolumeList": Method(pb.VolumeListRequest, self.volume_list),
                "VolumeRemove": Method(pb.VolumeRemoveRequest, self.volume_remove),
            },
        )


_EVENT_TYPES: dict[str, type[Message]] = {
    "/tasks/create": events_pb2.TaskCreate,
    "/tasks/start": events_pb2.TaskStart,
    "/tasks/exit": events_pb2.TaskExit,
    "/tasks/delete": events_pb2.TaskDelete,
    "/tasks/exec-added": events_pb2.TaskExecAdded,
    "/tasks/exec-started": events_pb2.TaskExecStarted,
    "/tasks/paused": events_pb2.TaskPaused,
    "/tasks/resumed": events_pb2.TaskResumed,
    "/tasks/oom": events_pb2.TaskOOM,
    "/tasks/checkpointed": events_pb2.TaskCheckpointed,
}


def _event_json(env: forward_pb2.Envelope) -> str:
    """One line per event, as `ctr events` shows them (field names as in the proto)."""
    kind = _EVENT_TYPES.get(env.topic)
    if kind is None:
        return "{}"
    try:
        msg = anyutil.unpack(env.event, kind)
    except Exception:
        return "{}"
    data = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return json.dumps(data, separators=(",", ":"))


class EventsService:
    """Where shims forward their events ($TTRPC_ADDRESS)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor
        # Shims replay their outbox after a reconnect, so an exit whose acknowledgement
        # was lost arrives again; remembered by its full identity, oldest forgotten.
        self._seen_exits: collections.OrderedDict[tuple[str, str, int, int, int], None] = (
            collections.OrderedDict()
        )
        self.duplicates = 0

    def _duplicate_exit(self, ev: events_pb2.TaskExit) -> bool:
        key = (
            ev.container_id,
            ev.id,
            ev.pid,
            ev.exit_status,
            timeutil.ns_from_timestamp(ev.exited_at),
        )
        if key in self._seen_exits:
            self._seen_exits.move_to_end(key)
            self.duplicates += 1
            return True
        self._seen_exits[key] = None
        if len(self._seen_exits) > SEEN_EXITS_MAX:
            self._seen_exits.popitem(last=False)
        return False

    async def forward(
        self, ctx: RequestContext, req: forward_pb2.ForwardRequest
    ) -> empty_pb2.Empty:
        env = req.envelope
        if log.isEnabledFor(logging.DEBUG):
            log.debug("forwarded event %s %s", env.topic, _event_json(env))
        if env.topic == "/tasks/exit":
            try:
                ev = anyutil.unpack(env.event, events_pb2.TaskExit)
            except Exception as exc:
                raise TtrpcError(Code.INVALID_ARGUMENT, f"bad /tasks/exit event: {exc}") from exc
            if self._duplicate_exit(ev):
                log.debug("duplicate exit of %s/%s ignored", ev.container_id, ev.id)
                return empty_pb2.Empty()
            self.sup.on_task_exit(
                ev.container_id, ev.id, ev.exit_status, timeutil.ns_from_timestamp(ev.exited_at)
            )
        elif env.topic == "/tasks/oom":
            try:
                oom = anyutil.unpack(env.event, events_pb2.TaskOOM)
            except Exception as exc:
                raise TtrpcError(Code.INVALID_ARGUMENT, f"bad /tasks/oom event: {exc}") from exc
            self.sup.on_oom(oom.container_id)
        return empty_pb2.Empty()

    def register(self, server: Server) -> None:
        server.register(
            EVENTS_SERVICE, {"Forward": Method(forward_pb2.ForwardRequest, self.forward)}
        )
