"""OOM notifications from the kernel's cgroup interfaces, read on the event loop.

cgroup v1: an eventfd registered on ``memory.oom_control`` through
``cgroup.event_control``; the kernel also signals it when the cgroup is removed, which
is how a watch ends. cgroup v2: inotify on ``memory.events``; an OOM is an increase of
its ``oom_kill`` counter. Nothing here polls (io.md §6): the one timer is a short burst
of reads that an OOM the kernel signalled starts (RECHECK_DELAYS).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from protocol.proto.events import task_pb2 as events_pb2
from shim.sys.inotify import IN_IGNORED, IN_MODIFY, Inotify
from shim.task.process import EventSink
from shim.task.stats import Cgroup

__all__ = ["RECHECK_DELAYS", "OomWatcher", "read_memory_events"]

log = logging.getLogger(__name__)


# After memory.events' ``max`` or ``oom`` counter rose without its ``oom_kill`` (the
# cgroup hit its limit; the OOM killer may be choosing a victim), the file is read again
# after each of these delays (~0.25 s in all) until the kill is counted or the file is
# gone. The kill's own notification is not enough under runc's systemd driver: the
# kernel notifies a cgroup file at most once per 10 ms, and the victim's exit empties the
# container's scope, which systemd removes, memory.events with it, within that time
# (Debian sid guest, 12 rounds: the notified reads saw ``max`` only, or nothing, then the
# file was gone 1-40 ms later; 1 kill of 12 was read, 7 with the burst). A container held
# at its limit raises ``max`` up to every 10 ms: a burst then runs on without restarting,
# ~30 reads a second beside the notified ones; only an ``oom`` rise restarts it.
RECHECK_DELAYS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128)


def read_memory_events(memory_events: str) -> tuple[int, int, int] | None:
    """memory.events' (max, oom, oom_kill) counters; None when it cannot be read (gone)."""
    counts = {"max": 0, "oom": 0, "oom_kill": 0}
    try:
        with open(memory_events) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key in counts:
                    counts[key] = int(value)
    except (OSError, ValueError):
        return None
    return counts["max"], counts["oom"], counts["oom_kill"]


@dataclass
class _V1Watch:
    eventfd: int
    memory_dir: str


@dataclass
class _V2Watch:
    wd: int
    events_path: str
    counts: tuple[int, int, int]  # (max, oom, oom_kill) as last read
    recheck: asyncio.TimerHandle | None = None
    rechecks: int = 0  # of RECHECK_DELAYS used by the burst under way; 0: none is


class OomWatcher:
    """Publishes ``/tasks/oom`` for every watched container whose cgroup OOM-kills."""

    def __init__(self, events: EventSink, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._events = events
        self._loop = loop or asyncio.get_running_loop()
        self._v1: dict[str, _V1Watch] = {}
        self._v2: dict[str, _V2Watch] = {}
        self._inotify: Inotify | None = None

    def watch(self, container_id: str, cgroup: Cgroup) -> None:
        """Start watching; a cgroup without a memory controller is silently skipped."""
        self.unwatch(container_id)
        memory_dir = cgroup.memory_dir
        if memory_dir is None:
            return
        try:
            if cgroup.unified:
                self._watch_v2(container_id, os.path.join(memory_dir, "memory.events"))
            else:
                self._watch_v1(container_id, memory_dir)
        except OSError as exc:
            # The container still runs without OOM events; that is not worth failing Start.
            log.warning("cannot watch %s for OOM: %s", container_id, exc)

    def _watch_v1(self, container_id: str, memory_dir: str) -> None:
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            ofd = os.open(
                os.path.join(memory_dir, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC
            )
            try:
                with open(os.path.join(memory_dir, "cgroup.event_control"), "w") as ctl:
                    ctl.write(f"{efd} {ofd}")
            finally:
                # The kernel keeps its own reference once registered.
                os.close(ofd)
            self._loop.add_reader(efd, self._on_v1, container_id)
        except BaseException:
            os.close(efd)
            raise
        self._v1[container_id] = _V1Watch(efd, memory_dir)

    def _watch_v2(self, container_id: str, events_path: str) -> None:
        if self._inotify is None:
            self._inotify = Inotify()
            self._loop.add_reader(self._inotify.fd, self._on_inotify)
        wd = self._inotify.add_watch(events_path, IN_MODIFY)
        counts = read_memory_events(events_path) or (0, 0, 0)
        self._v2[container_id] = _V2Watch(wd, events_path, counts)

    def flush(self, container_id: str) -> None:
        """Deliver a notification already signalled but not yet read.

        Called before the container's exit is published, so a consumer (CRI's
        OOMKilled reason) sees the OOM first even when both became ready together.
        """
        if container_id in self._v1:
            self._on_v1(container_id)
        elif container_id in self._v2:
            self._check_v2(container_id)

    def unwatch(self, container_id: str) -> None:
        v1 = self._v1.pop(container_id, None)
        if v1 is not None:
            self._loop.remove_reader(v1.eventfd)
            os.close(v1.eventfd)
        v2 = self._v2.pop(container_id, None)
        if v2 is not None:
            _stop_recheck(v2)
            if self._inotify is not None:
                self._inotify.rm_watch(v2.wd)

    def close(self) -> None:
        for container_id in list(self._v1) + list(self._v2):
            self.unwatch(container_id)
        if self._inotify is not None:
            self._loop.remove_reader(self._inotify.fd)
            self._inotify.close()
            self._inotify = None

    def _publish(self, container_id: str) -> None:
        log.info("OOM in container %s", container_id)
        self._events.publish("/tasks/oom", events_pb2.TaskOOM(container_id=container_id))

    def _on_v1(self, container_id: str) -> None:
        watch = self._v1.get(container_id)
        if watch is None:
            return
        try:
            os.eventfd_read(watch.eventfd)
        except BlockingIOError:
            return
        if not os.path.isdir(watch.memory_dir):
            self.unwatch(container_id)
            return
        self._publish(container_id)

    def _on_inotify(self) -> None:
        assert self._inotify is not None
        events = self._inotify.read_events()
        by_wd = {w.wd: cid for cid, w in self._v2.items()}
        for wd, mask, _ in events:
            container_id = by_wd.get(wd)
            if container_id is None:
                continue
            if mask & IN_IGNORED:
                # The file (with its cgroup) is gone; the kernel dropped the watch.
                gone = self._v2.pop(container_id, None)
                if gone is not None:
                    _stop_recheck(gone)
            else:
                self._check_v2(container_id)

    def _check_v2(self, container_id: str) -> None:
        watch = self._v2.get(container_id)
        if watch is None:
            return
        counts = read_memory_events(watch.events_path)
        if counts is None:
            return
        (hits, ooms, kills), (old_hits, old_ooms, old_kills) = counts, watch.counts
        watch.counts = counts
        if kills > old_kills:
            _stop_recheck(watch)
            self._publish(container_id)
        elif ooms > old_ooms:
            _stop_recheck(watch)
            self._arm_recheck(container_id, watch)
        elif hits > old_hits and not watch.rechecks:
            self._arm_recheck(container_id, watch)

    def _arm_recheck(self, container_id: str, watch: _V2Watch) -> None:
        if watch.rechecks < len(RECHECK_DELAYS):
            delay = RECHECK_DELAYS[watch.rechecks]
            watch.rechecks += 1
            watch.recheck = self._loop.call_later(delay, self._recheck, container_id)
        else:
            watch.rechecks = 0  # the burst is over

    def _recheck(self, container_id: str) -> None:
        watch = self._v2.get(container_id)
        if watch is None:
            return
        watch.recheck = None
        self._check_v2(container_id)
        # Neither a kill (published: the burst ends) nor a new OOM (a new burst): go on.
        if watch.recheck is None and watch.rechecks and self._v2.get(container_id) is watch:
            self._arm_recheck(container_id, watch)


def _stop_recheck(watch: _V2Watch) -> None:
    if watch.recheck is not None:
        watch.recheck.cancel()
        watch.recheck = None
    watch.rechecks = 0
