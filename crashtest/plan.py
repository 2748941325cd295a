"""The workload and its faults as a pure function of the seed.

Nothing here looks at the machine: the same (seed, ops, faults) always gives the same
steps, so a violation's seed and step number are enough to replay it. The generator
keeps its own model of each container so that it only plans operations that make sense
(an exec into a running container, a kill of one not yet told to die); what actually
happens at run time can still differ because faults interfere, and the runner copes.
"""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass, field

__all__ = ["FAULT_KINDS", "Fault", "Op", "Plan", "Step", "generate"]

# Exit codes a command chooses; 125-127 are avoided because the CLIs use them for
# their own failures, and 128+ because those mean "killed by a signal".
EXIT_CODES = (0, 1, 2, 3, 7, 42, 99)
# Signals the init of a long-running container handles (pid 1 of a pid namespace
# ignores signals it has no handler for, so the shell traps them and exits 128+S).
TRAPPED_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)
EXEC_SIGNALS = (signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGUSR2)
DELAYS = (0.0, 0.1, 0.3, 1.0)
MAX_LIVE = 4

FAULT_KINDS = (
    "daemon-kill",  # SIGKILL containerd/pyshimd mid-operation, then restart it
    "shim-kill",  # SIGKILL one container's shim
    "shim-stop",  # SIGSTOP a shim for a while, then SIGCONT
    "disk-full",  # fill the tmpfs holding the bundles for a few steps
    "client-kill",  # SIGKILL the ctr/pyshim client mid-call
    "slow-runc",  # runc sleeps before doing anything, for a few steps
)
FAULT_WEIGHTS = (2.0, 2.0, 1.0, 1.0, 1.5, 1.0)


@dataclass(frozen=True)
class Op:
    kind: str  # run, exec, kill, pause, resume, delete, status
    slot: str  # container name
    # run: "exit" (exits by itself with `code` after `delay`) or "serve" (runs until killed)
    mode: str = ""
    code: int = 0
    signal: int = 0
    delay: float = 0.0
    exec_id: str = ""

    def expected(self) -> int | None:
        """The exit status this op's process will have, if it decides it."""
        if self.kind == "run":
            return self.code if self.mode == "exit" else None
        if self.kind == "exec":
            return 128 + self.signal if self.signal else self.code
        if self.kind == "kill":
            return 128 + self.signal
        return None

    def describe(self) -> str:
        parts = [self.kind, self.slot]
        if self.kind == "run":
            parts.append(self.mode)
            if self.mode == "exit":
                parts.append(f"exit={self.code} after={self.delay}s")
        elif self.kind == "exec":
            parts.append(self.exec_id)
            what = (
                f"signal={signal.Signals(self.signal).name}" if self.signal else f"exit={self.code}"
            )
            parts.append(f"{what} after={self.delay}s")
        elif self.kind == "kill":
            parts.append(signal.Signals(self.signal).name)
        return " ".join(parts)


@dataclass(frozen=True)
class Fault:
    kind: str
    # seconds after the step's client started: the fault lands mid-operation
    at: float
    slot: str = ""  # shim faults: whose shim
    duration: float = 0.0  # shim-stop, slow-runc (runc's sleep)
    steps: int = 0  # disk-full, slow-runc: how many steps it lasts

    def describe(self) -> str:
        extra = f" shim-of={self.slot}" if self.slot else ""
        if self.duration:
            extra += f" for={self.duration}s"
        if self.steps:
            extra += f" steps={self.steps}"
        return f"{self.kind} at=+{self.at}s{extra}"


@dataclass(frozen=True)
class Step:
    index: int
    op: Op
    fault: Fault | None = None

    def describe(self) -> str:
        text = f"#{self.index:04d} {self.op.describe()}"
        return text + (f"  !! {self.fault.describe()}" if self.fault else "")


@dataclass
class Plan:
    seed: int
    steps: list[Step] = field(default_factory=list)
    # What it was generated from: enough to generate it again.
    ops: int = 0
    faults: int = 0
    kinds: tuple[str, ...] = FAULT_KINDS

    def dump(self) -> str:
        return "\n".join(s.describe() for s in self.steps)


@dataclass
class _Slot:
    name: str
    mode: str
    told_to_die: bool = False
    paused: bool = False
    execs: int = 0


def _script_delay(rng: random.Random) -> float:
    return rng.choice(DELAYS)


def generate(seed: int, ops: int, faults: int, kinds: tuple[str, ...] = FAULT_KINDS) -> Plan:
    """``ops`` operations, ``faults`` of them carrying a fault of one of ``kinds``, then
    deletes of the rest. With every kind, plans are those of earlier versions."""
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if unknown or not kinds:
        raise ValueError(f"fault kinds {unknown or '(none)'}: choose from {', '.join(FAULT_KINDS)}")
    if ops < 0 or faults < 0:
        raise ValueError("ops and faults cannot be negative")
    # In FAULT_KINDS order, whatever order they were named in: the plan depends on the set.
    kinds = tuple(k for k in FAULT_KINDS if k in kinds)
    rng = random.Random(seed)
    fault_at = set(rng.sample(range(ops), min(faults, ops))) if ops else set()
    plan = Plan(seed, ops=ops, faults=faults, kinds=kinds)
    live: dict[str, _Slot] = {}
    counter = 0
    for i in range(ops):
        op = _next_op(rng, live, counter)
        if op.kind == "run":
            counter += 1
        fault = _fault(rng, live, op, kinds) if i in fault_at else None
        plan.steps.append(Step(i, op, fault))
        _apply(live, op)
    # Every container is deleted by the end, so the leak checks see a clean slate.
    for name in sorted(live, key=lambda n: int(n[1:])):
        plan.steps.append(Step(len(plan.steps), Op("delete", name)))
    return plan


def _next_op(rng: random.Random, live: dict[str, _Slot], counter: int) -> Op:
    choices: list[tuple[str, float]] = []
    if len(live) < MAX_LIVE:
        choices.append(("run", 3.0 if len(live) < 2 else 1.5))
    serving = [s for s in live.values() if s.mode == "serve" and not s.told_to_die]
    running = [s for s in serving if not s.paused]
    if running:
        choices += [("exec", 3.0), ("kill", 1.0), ("pause", 0.5)]
    if any(s.paused for s in serving):
        choices.append(("resume", 2.0))
    if live:
        choices += [("delete", 1.5 if len(live) >= 3 else 0.7), ("status", 0.5)]
    names, weights = zip(*choices, strict=True)
    kind = rng.choices(names, weights)[0]
    if kind == "run":
        name = f"c{counter}"
        if rng.random() < 0.5:
            return Op(
                "run", name, mode="exit", code=rng.choice(EXIT_CODES), delay=_script_delay(rng)
            )
        return Op("run", name, mode="serve")
    if kind in ("exec", "kill", "pause"):
        slot = rng.choice(sorted(running, key=lambda s: s.name))
        if kind == "exec":
            exec_id = f"{slot.name}-e{slot.execs}"
            if rng.random() < 0.4:
                sig = rng.choice(EXEC_SIGNALS)
                return Op("exec", slot.name, signal=sig, delay=_script_delay(rng), exec_id=exec_id)
            return Op(
                "exec",
                slot.name,
                code=rng.choice(EXIT_CODES),
                delay=_script_delay(rng),
                exec_id=exec_id,
            )
        if kind == "kill":
            sig = rng.choice((*TRAPPED_SIGNALS, signal.SIGKILL))
            return Op("kill", slot.name, signal=sig)
        return Op("pause", slot.name)
    if kind == "resume":
        slot = rng.choice(sorted((s for s in serving if s.paused), key=lambda s: s.name))
        return Op("resume", slot.name)
    slot = rng.choice(sorted(live.values(), key=lambda s: s.name))
    return Op(kind, slot.name)


def _apply(live: dict[str, _Slot], op: Op) -> None:
    if op.kind == "run":
        live[op.slot] = _Slot(op.slot, op.mode)
        return
    slot = live.get(op.slot)
    if slot is None:
        return
    if op.kind == "exec":
        slot.execs += 1
    elif op.kind == "kill":
        slot.told_to_die = True
    elif op.kind == "pause":
        slot.paused = True
    elif op.kind == "resume":
        slot.paused = False
    elif op.kind == "delete":
        del live[op.slot]


def _fault(rng: random.Random, live: dict[str, _Slot], op: Op, kinds: tuple[str, ...]) -> Fault:
    weights = [w for k, w in zip(FAULT_KINDS, FAULT_WEIGHTS, strict=True) if k in kinds]
    kind = rng.choices(kinds, weights)[0]
    at = rng.choice((0.0, 0.05, 0.2, 0.5))
    if kind in ("shim-kill", "shim-stop"):
        # Mostly the shim the operation talks to: that is where mid-call faults hurt.
        names = sorted(live) or [op.slot]
        slot = op.slot if rng.random() < 0.7 else rng.choice(names)
        duration = rng.choice((0.5, 1.0, 2.0)) if kind == "shim-stop" else 0.0
        return Fault(kind, at, slot=slot, duration=duration)
    if kind == "disk-full":
        return Fault(kind, at, steps=rng.randint(1, 4))
    if kind == "slow-runc":
        return Fault(kind, 0.0, duration=rng.choice((0.5, 1.0)), steps=rng.randint(1, 4))
    return Fault(kind, at)
