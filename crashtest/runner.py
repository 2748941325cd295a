"""Executes a plan through a driver, injects its faults, checks the invariants.

What is acceptable for an exit status (the rules the report applies):

* The workload decides the status: `exit N` -> N, a signal S -> 128+S (the init of a
  long-running container traps HUP/INT/USR1/TERM and exits 128+S, because pid 1 of a
  pid namespace ignores signals it does not handle; SIGKILL is real), and a delete of
  a container nobody told to die kills it with SIGKILL -> 137.
* A container whose shim was SIGKILLed before its exit was observed may instead be
  reported as 137: the shim's `delete` kills what is left and, without a record of
  the real exit, containerd's convention is 137. Its execs may be reported as 137 too.
* When the operation that would decide the status failed (its client was killed, the
  daemon died, the disk was full), either outcome is acceptable (it may or may not
  have reached the container); a run that failed may leave no container at all.
* Whatever the value, every source (CLI rc, status queries, wait, delete, every exit
  event) must report the same one: a second, different value is a violation even when
  both are individually acceptable.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from crashtest import procs
from crashtest.drivers import Driver, Event, Observation, OpOutcome
from crashtest.plan import Fault, Op, Plan, Step
from crashtest.result import Degradation, Report, StepRecord, Violation

__all__ = ["Container", "ProcState", "Report", "Runner", "Violation"]

ZOMBIE_CHECK_EVERY = 25
# How long the daemon gets to notice a dead shim and clean up after it.
ORPHAN_WAIT = 10.0
# Shims left without containers (their daemon died between Delete and Shutdown) leave
# on their own after a grace period (shim.task.service.EMPTY_SHUTDOWN_GRACE).
LEAK_WAIT = 15.0
# After a daemon restart, a shim it does not list must leave by itself. The longest
# legitimate stay: a Create whose client was killed waits out the 30 s bound on its
# stdio fifos' reader (shim.io.copy.FIFO_OPEN_TIMEOUT, io.md), containerd's cleanup
# Delete waits for that Create (finding 3), then the 5 s empty grace (finding 11).
EMPTY_SHIM_WAIT = 40.0


@dataclass
class ProcState:
    """One process (init or exec) and what we know about its exit."""

    acceptable: set[int] = field(default_factory=set)
    observations: list[tuple[int, str, int]] = field(default_factory=list)  # status, source, step
    started: bool = True
    # Anything may be acceptable (the deciding op failed); only consistency is checked.
    uncertain: bool = False
    # Accepted only because the shim was SIGKILLed first (the real status was lost).
    lenient: set[int] = field(default_factory=set)


@dataclass
class Container:
    name: str
    mode: str
    init: ProcState
    execs: dict[str, ProcState] = field(default_factory=dict)
    paused: bool = False
    told_to_die: bool = False
    shim_killed: bool = False
    deleted: bool = False
    created_step: int = 0


def init_script(op: Op) -> str:
    if op.mode == "exit":
        pause = f"sleep {op.delay}; " if op.delay else ""
        return f"{pause}exit {op.code}"
    traps = " ".join(
        f"trap 'exit {128 + int(s)}' {s.name[3:]};"
        for s in (signal.SIGHUP, signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)
    )
    # `wait` returns when a trapped signal arrives; the trap then exits 128+S.
    return f"{traps} sleep 100000 & wait"


def exec_script(op: Op) -> str:
    pause = f"sleep {op.delay}; " if op.delay else ""
    if op.signal:
        return f"{pause}kill -{signal.Signals(op.signal).name[3:]} $$"
    return f"{pause}exit {op.code}"


class Runner:
    def __init__(self, driver: Driver, plan: Plan, *, log: Callable[[str], None] | None = None):
        self.d = driver
        self.plan = plan
        self.log = log or (lambda _m: None)
        self.containers: dict[str, Container] = {}
        self.report = Report(
            driver.name,
            driver.runtime,
            plan.seed,
            planned_ops=plan.ops,
            planned_faults=plan.faults,
            fault_kinds=list(plan.kinds),
        )
        self._t0 = time.monotonic()
        self._disk_full_until = -1
        self._slow_until = -1
        self._step = 0
        self._fired: set[int] = set()
        self._reconnect_reported: set[str] = set()

    # -- bookkeeping ------------------------------------------------------------------

    def violation(self, kind: str, step: int, detail: str, container: str = "") -> None:
        v = Violation(kind, step, detail, container=container)
        self.report.violations.append(v)
        self.log("VIOLATION " + v.describe(self.plan.seed))

    def _observe(self, c: Container, obs: Observation, step: int) -> None:
        ps = c.init if not obs.process else c.execs.setdefault(obs.process, ProcState())
        ps.observations.append((obs.status, obs.source, step))

    # -- main loop --------------------------------------------------------------------

    def run(self) -> Report:
        self._t0 = t0 = time.monotonic()
        try:
            for step in self.plan.steps:
                self._step = step.index
                self._do_step(step)
                if step.index % ZOMBIE_CHECK_EVERY == ZOMBIE_CHECK_EVERY - 1:
                    self._check_zombies(step.index)
            self._end_faults()
            self._finish()
            self._attach_history()
        finally:
            self.d.set_slow_runc(0)
            self.d.free_disk()
            self.report.seconds = time.monotonic() - t0
            self.report.commands = self.d.cmds.count
        return self.report

    def _do_step(self, step: Step) -> None:
        if step.index > self._disk_full_until >= 0:
            self.d.free_disk()
            self._disk_full_until = -1
        if step.index > self._slow_until >= 0:
            self.d.set_slow_runc(0)
            self._slow_until = -1
        op = step.op
        self.report.steps += 1
        self.report.ops[op.kind] = self.report.ops.get(op.kind, 0) + 1
        self.log(step.describe())
        record = StepRecord(
            step.index,
            op.kind,
            op.slot,
            step.describe(),
            start=time.monotonic() - self._t0,
            end=0.0,
            fault=step.fault.kind if step.fault else "",
            fault_text=step.fault.describe() if step.fault else "",
        )
        self.report.timeline.append(record)
        fault_thread: threading.Thread | None = None
        restart = False
        skipped_before = self.report.faults_skipped
        if step.fault is not None:
            fault_thread, restart = self._arm(step, step.fault)
        try:
            outcome = self._do_op(step)
        finally:
            if fault_thread is not None:
                fault_thread.join()
            self.d.cmds.cancel_pending_kill()
            record.end = time.monotonic() - self._t0
        if step.fault is not None:
            record.fired = self.report.faults_skipped == skipped_before
        if outcome is None:
            record.outcome = "skipped"
        elif outcome.unsupported:
            record.outcome = "unsupported"
        elif outcome.errors:
            record.outcome = "error"
            record.errors = list(outcome.errors)
        if (
            outcome is not None
            and step.index in self._fired
            and step.op.kind == "run"
            and any("start failed: dial" in e for e in outcome.errors)
        ):
            self.d.unreachable_sockets.add(self.d.ids.get(step.op.slot, step.op.slot))
            self.report.tolerated.append(
                f"#{step.index} {step.op.slot}: shim killed before containerd dialed it; "
                "its socket file stays (containerd runs no delete in that path)"
            )
        if outcome is not None:
            if outcome.unsupported:
                self.report.unsupported += 1
            elif outcome.errors:
                self.report.op_errors += 1
                self.report.errors += [f"#{step.index} {e}" for e in outcome.errors]
                self.log("  errors: " + "; ".join(outcome.errors))
        if restart:
            self._restart_daemon(step.index)
        if step.fault is not None and step.fault.kind == "shim-kill" and step.index in self._fired:
            self._check_orphans(step)

    # -- operations -------------------------------------------------------------------

    def _do_op(self, step: Step) -> OpOutcome | None:
        op, i = step.op, step.index
        if op.kind == "run":
            c = Container(
                op.slot, op.mode, ProcState(acceptable=_known(op.expected())), created_step=i
            )
            self.containers[op.slot] = c
            self.report.containers += 1
            out = self.d.run(op.slot, init_script(op))
            if not out.ok:
                # It may or may not exist, and may or may not have started.
                c.init.uncertain = True
            return out
        found = self.containers.get(op.slot)
        if found is None or found.deleted:
            return None
        c = found
        if op.kind == "exec":
            ps = c.execs.setdefault(op.exec_id, ProcState(acceptable={op.expected() or 0}))
            out = self.d.exec(op.slot, op.exec_id, exec_script(op))
            if not out.ok:
                ps.uncertain = True
            for obs in out.observations:
                self._observe(c, obs, i)
            return out
        if op.kind == "kill":
            out = self.d.kill(op.slot, op.signal)
            c.told_to_die = True
            c.init.acceptable.add(128 + op.signal)
            if not out.ok and c.mode == "serve":
                # Delivered or not: the delete's SIGKILL decides otherwise.
                c.init.acceptable.add(137)
            return out
        if op.kind in ("pause", "resume"):
            out = self.d.pause(op.slot, resume=op.kind == "resume")
            if not out.unsupported:
                # A pause that failed may still have frozen it: resume on delete anyway.
                c.paused = op.kind == "pause" or (c.paused and not out.ok)
            return out
        if op.kind == "status":
            out = self.d.status(op.slot)
            for obs in out.observations:
                self._observe(c, obs, i)
            return out
        if op.kind == "delete":
            kill_first = c.mode == "serve" and not c.told_to_die
            if kill_first or c.init.uncertain:
                c.init.acceptable.add(137)
            out = self.d.delete(
                op.slot, kill_first=kill_first or c.init.uncertain, resume_first=c.paused
            )
            for obs in out.observations:
                self._observe(c, obs, i)
            c.deleted = True
            return out
        raise ValueError(op.kind)

    # -- faults -----------------------------------------------------------------------

    def _arm(self, step: Step, fault: Fault) -> tuple[threading.Thread | None, bool]:
        kind = fault.kind
        self.report.faults[kind] = self.report.faults.get(kind, 0) + 1
        if kind == "slow-runc":
            self.d.set_slow_runc(fault.duration)
            self._slow_until = step.index + fault.steps - 1
            return None, False
        if kind == "disk-full":
            target: Callable[[], object] = self._fill_disk
            self._disk_full_until = step.index + fault.steps - 1
        elif kind == "client-kill":
            target = self.d.cmds.kill_current
        elif kind == "daemon-kill":
            target = self._kill_daemon
        elif kind in ("shim-kill", "shim-stop"):
            c = self.containers.get(fault.slot)
            creating = step.op.kind == "run" and step.op.slot == fault.slot
            if c is None and not creating:
                self.report.faults_skipped += 1
                return None, False

            def target() -> None:
                pid = self._find_shim(fault.slot, creating)
                if pid is None:
                    self.report.faults_skipped += 1
                    return
                self._fired.add(step.index)
                if kind == "shim-stop":
                    self._stop_shim(pid, fault.duration)
                    return
                # From here on, an exit not yet observed may honestly be 137.
                victim = self.containers[fault.slot]
                victim.shim_killed = True
                victim.init.lenient.add(137)
                for ps in victim.execs.values():
                    ps.lenient.add(137)
                procs.kill_pid(pid)

        else:
            raise ValueError(kind)

        def fire() -> None:
            time.sleep(fault.at)
            target()

        t = threading.Thread(target=fire, name=f"fault-{kind}", daemon=True)
        t.start()
        return t, kind == "daemon-kill"

    def _find_shim(self, name: str, creating: bool) -> int | None:
        """The shim of ``name``; while it is being created, the one no one knows yet
        (the manager picks the id, so a new shim is recognised by being new)."""
        pid = self.d.shim_of(name)
        if pid is not None or not creating:
            return pid
        known = {i for n, i in self.d.ids.items() if n != name}
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            fresh = [p for cid, p in self.d.shim_pids().items() if cid not in known]
            if fresh:
                return fresh[0]
            time.sleep(0.01)
        return None

    def _fill_disk(self) -> None:
        self.d.fill_disk()

    def _kill_daemon(self) -> None:
        self.d.kill_daemon()

    @staticmethod
    def _stop_shim(pid: int, seconds: float) -> None:
        if not procs.kill_pid(pid, signal.SIGSTOP):
            return
        try:
            time.sleep(seconds)
        finally:
            procs.kill_pid(pid, signal.SIGCONT)

    def _restart_daemon(self, step: int) -> None:
        self.report.daemon_restarts += 1
        live = {name: pid for name in self.containers if (pid := self.d.shim_of(name)) is not None}
        self.d.start_daemon()
        problems = self.d.reconnect_problems(live)
        if problems:
            # A shim the daemon died with between Delete and Shutdown holds nothing any
            # more and is rightly not listed; it must leave by itself, though.
            waiting = [
                live[n] for n, _ in problems if n in live and n not in self._reconnect_reported
            ]
            deadline = time.monotonic() + EMPTY_SHIM_WAIT
            while any(procs.alive(p) for p in waiting) and time.monotonic() < deadline:
                time.sleep(0.2)
            problems = self.d.reconnect_problems(live)
        for name, problem in problems:
            # A shim left behind stays so: report it once, not at every restart.
            if name and name in self._reconnect_reported:
                continue
            self._reconnect_reported.add(name)
            self.violation("reconnect", step, problem, container=name)

    def _check_orphans(self, step: Step) -> None:
        """The daemon must notice the dead shim and kill what it left running."""
        assert step.fault is not None
        cid = self.d.ids.get(step.fault.slot, "")
        if not cid:
            return
        deadline = time.monotonic() + ORPHAN_WAIT
        key = self.d.cgroup_key(cid)
        left = procs.in_cgroup_of([key])
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = procs.in_cgroup_of([key])
        for p in left:
            self.violation(
                "orphan",
                step.index,
                f"{step.fault.slot}: process {p.pid} ({' '.join(p.argv)[:60]}) "
                f"still running {ORPHAN_WAIT:.0f}s after its shim was SIGKILLed",
                container=step.fault.slot,
            )

    def _end_faults(self) -> None:
        self.d.set_slow_runc(0)
        self.d.free_disk()

    # -- invariants -------------------------------------------------------------------

    def _check_zombies(self, step: int) -> None:
        parents = set(self.d.shim_pids().values())
        dpid = self.d.daemon_pid()
        if dpid:
            parents.add(dpid)
        first = procs.zombies_of(parents)
        if not first:
            return
        # A zombie is normal for an instant; one still there a second later is not reaped.
        time.sleep(1.0)
        for pid, ppid in first & procs.zombies_of(parents):
            self.violation("zombie", step, f"zombie {pid} of {ppid} not reaped for 1s")

    def _finish(self) -> None:
        end = -1
        # Containers the plan deleted while a fault made the delete fail are deleted
        # again, through the daemon, so what remains is what deletion leaves behind.
        for name, obs in self.d.cleanup_all():
            if name in self.containers:
                self._observe(self.containers[name], obs, end)
        time.sleep(0.5)
        self._check_zombies(end)
        events = self.d.events()
        self.report.events = len(events)
        by_id = {self.d.ids.get(n, n): c for n, c in self.containers.items()}
        for ev in events:
            c = by_id.get(ev.container_id)
            if c is None or ev.status is None:
                continue
            source = "event " + ev.topic
            self._observe(c, Observation(ev.process, ev.status, source), end)
        self._check_order(events, by_id)
        for c in self.containers.values():
            self._check_exits(c)
        self._check_exit_events(events, by_id)
        deadline = time.monotonic() + LEAK_WAIT
        leftovers = self.d.leftovers()
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.5)
            leftovers = self.d.leftovers()
        for leftover in leftovers:
            self.violation("leak", end, leftover)

    def _check_exits(self, c: Container) -> None:
        procs_ = [("init", c.init)] + [(f"exec {k}", v) for k, v in c.execs.items()]
        for what, ps in procs_:
            values = {s for s, _src, _st in ps.observations}
            sources = ", ".join(f"{src}@{st}={s}" for s, src, st in ps.observations)
            where = ps.observations[0][2] if ps.observations else c.created_step
            if not values:
                # An exec whose client failed and whose events we may have missed, or a
                # run that never happened, leaves nothing to check.
                if ps.uncertain or what != "init":
                    continue
                self.violation(
                    "exit-unknown",
                    c.created_step,
                    f"{c.name} {what}: no exit status was ever reported",
                    container=c.name,
                )
                continue
            self.report.exits_checked += 1
            if len(values) > 1:
                self.violation(
                    "exit-twice",
                    where,
                    f"{c.name} {what}: different statuses: {sources}",
                    container=c.name,
                )
            if ps.uncertain or not ps.acceptable | ps.lenient:
                continue
            wrong = values - ps.acceptable - ps.lenient
            if wrong:
                self.violation(
                    "exit-wrong",
                    where,
                    f"{c.name} {what}: expected {sorted(ps.acceptable | ps.lenient)}, got "
                    f"{sorted(wrong)} ({sources})",
                    container=c.name,
                )
            elif values & (ps.lenient - ps.acceptable):
                self.report.degraded.append(
                    Degradation(
                        "exit-lost-to-137",
                        c.name,
                        f"{c.name} {what}: reported 137 after its shim was SIGKILLed; the "
                        f"workload decided {sorted(ps.acceptable) or 'nothing yet'} ({sources})",
                    )
                )

    def _check_order(self, events: list[Event], by_id: dict[str, Container]) -> None:
        seen: dict[tuple[str, str], list[str]] = {}
        for ev in events:
            if ev.container_id not in by_id:
                continue
            proc = ev.process if ev.topic != "/tasks/delete" else ""
            seen.setdefault((ev.container_id, proc), []).append(ev.topic)
            if ev.topic in ("/tasks/exec-added", "/tasks/exec-started"):
                continue
        rules = {
            # event: events that, when both were seen, must come first
            "/tasks/start": ("/tasks/create",),
            "/tasks/delete": ("/tasks/exit",),
            "/tasks/exec-started": ("/tasks/exec-added",),
        }
        for (cid, proc), topics in seen.items():
            name = by_id[cid].name
            for i, topic in enumerate(topics):
                for before in rules.get(topic, ()):
                    if before in topics[i + 1 :] and before not in topics[:i]:
                        self.violation(
                            "order",
                            -1,
                            f"{name} {proc or 'init'}: {topic} before {before} "
                            f"({' '.join(topics)})",
                            container=name,
                        )
            if "/tasks/exit" in topics and proc:
                i = topics.index("/tasks/exit")
                if "/tasks/exec-started" in topics[i + 1 :]:
                    self.violation(
                        "order", -1, f"{name} {proc}: exit before exec-started", container=name
                    )
            if (
                not proc
                and "/tasks/exit" in topics
                and "/tasks/start" in topics
                and topics.index("/tasks/exit") < topics.index("/tasks/start")
            ):
                self.violation("order", -1, f"{name}: init exit before start", container=name)

    def _check_exit_events(self, events: list[Event], by_id: dict[str, Container]) -> None:
        """An init whose exit some other source reported and that was not in doubt
        should have had a /tasks/exit event: one that never came is noted."""
        with_exit = {
            ev.container_id for ev in events if ev.topic == "/tasks/exit" and not ev.process
        }
        for cid, c in by_id.items():
            seen = [o for o in c.init.observations if not o[1].startswith("event")]
            if seen and not c.init.uncertain and cid not in with_exit:
                self.report.degraded.append(
                    Degradation(
                        "exit-event-missing",
                        c.name,
                        f"{c.name} init: exit {seen[0][0]} reported by {seen[0][1]}, "
                        "but no /tasks/exit event reached the subscriber",
                    )
                )

    # -- history ----------------------------------------------------------------------

    def _name_in(self, text: str) -> str:
        """The container a leftover's description names (by runtime id or name)."""
        for name, cid in sorted(self.d.ids.items()):
            for key in {cid, name} - {""}:
                if re.search(rf"(?<![\w-]){re.escape(key)}(?![\w-])", text):
                    return name
        return ""

    def history(self, container: str, until: int) -> list[int]:
        """The steps that led to a finding about ``container`` at step ``until`` (-1:
        the end of the run): its own steps, the faults on its shim, and every daemon
        kill from its first step on (those hit every container)."""
        timeline = self.report.timeline
        last = until if until >= 0 else len(timeline)
        mine = [
            r.index
            for r in timeline
            if r.index <= last and (r.slot == container or self._fault_slot(r.index) == container)
        ]
        first = mine[0] if mine else 0
        daemon = [
            r.index
            for r in timeline
            if first <= r.index <= last and r.fault == "daemon-kill" and r.fired
        ]
        return sorted(set(mine) | set(daemon))

    def _fault_slot(self, index: int) -> str:
        fault = self.plan.steps[index].fault if index < len(self.plan.steps) else None
        return fault.slot if fault is not None else ""

    def _records(self, container: str) -> list[str]:
        c = self.containers.get(container)
        if c is None:
            return []
        out = []
        for what, ps in [("init", c.init), *((f"exec {k}", v) for k, v in c.execs.items())]:
            for status, source, step in ps.observations:
                at = f"step {step}" if step >= 0 else "end"
                out.append(f"{what}: {status} from {source} ({at})")
        return out

    def blame(self, container: str, until: int) -> list[str]:
        """The fault kinds that hit ``container`` itself up to step ``until`` (-1: the
        end): a shim fault on its shim; any other fault during one of its own
        operations (a full disk or slow runc for as many steps as it lasts); and the
        fault of the step the finding was made at."""
        last = until if until >= 0 else len(self.report.timeline)
        kinds: set[str] = set()
        windows: list[tuple[int, int, str]] = []
        for r in self.report.timeline:
            if r.index > last:
                break
            fault = self.plan.steps[r.index].fault if r.index < len(self.plan.steps) else None
            if fault is not None and r.fired:
                if fault.steps:
                    windows.append((r.index, r.index + fault.steps - 1, fault.kind))
                if fault.kind in ("shim-kill", "shim-stop"):
                    if fault.slot == container or r.index == until:
                        kinds.add(fault.kind)
                elif r.slot == container or r.index == until:
                    kinds.add(fault.kind)
            if r.slot == container:
                kinds.update(k for lo, hi, k in windows if lo <= r.index <= hi)
        return sorted(kinds)

    def _attach_history(self) -> None:
        for v in self.report.violations:
            if not v.container:
                v.container = self._name_in(v.detail)
            # A lost exit is placed at the container's creation, but its whole life
            # led to it.
            until = -1 if v.kind == "exit-unknown" else v.step
            v.steps = self.history(v.container, until) if v.container else []
            v.fault_kinds = self.blame(v.container, until) if v.container else []
            v.records = self._records(v.container)
        for d in self.report.degraded:
            d.fault_kinds = self.blame(d.container, -1)


def _known(value: int | None) -> set[int]:
    return set() if value is None else {value}
