"""What a run recorded: counts, the timeline of its steps, violations with their history.

A Report is plain data: `to_json`/`from_json` round-trip it, so a run's result can be
kept (`--json FILE`), rendered again later (`--load FILE`) and compared with another.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CATEGORIES", "Degradation", "Report", "StepRecord", "Violation", "category"]

FORMAT = "pyshim-crashtest/1"

# What a violation is about, as a runtime author sorts them.
CATEGORIES = {
    "exit-unknown": "exits",
    "exit-twice": "exits",
    "exit-wrong": "exits",
    "order": "events",
    "orphan": "resources",
    "zombie": "resources",
    "leak": "resources",
    "reconnect": "resources",
}


def category(kind: str) -> str:
    return CATEGORIES.get(kind, kind.split("-")[0])


@dataclass
class Violation:
    kind: str
    step: int
    detail: str
    container: str = ""
    # The plan steps that led to it: the container's own, and every fault from its
    # first step to the violation (a daemon kill hits everyone).
    steps: list[int] = field(default_factory=list)
    fault_kinds: list[str] = field(default_factory=list)
    # What each source reported (status, source, step), and the log lines naming it.
    records: list[str] = field(default_factory=list)
    evidence: list[str] = field(default_factory=list)

    def describe(self, seed: int) -> str:
        where = f"step {self.step}" if self.step >= 0 else "end of run"
        return f"[{self.kind}] seed={seed} {where}: {self.detail}"


@dataclass
class Degradation:
    """Not a violation (the rules allow it) but worth knowing: a guarantee kept weaker,
    e.g. a real exit status replaced by 137 after the shim was SIGKILLed."""

    kind: str
    container: str
    detail: str
    fault_kinds: list[str] = field(default_factory=list)


@dataclass
class StepRecord:
    index: int
    op: str  # the op's kind
    slot: str
    text: str  # Step.describe()
    start: float  # seconds since the run started
    end: float
    outcome: str = "ok"  # ok, error, unsupported, skipped (nothing to act on)
    errors: list[str] = field(default_factory=list)
    fault: str = ""  # its fault's kind
    fault_text: str = ""
    # The fault did hit something (a shim fault whose shim was found, say).
    fired: bool = False


@dataclass
class Report:
    driver: str
    runtime: str
    seed: int
    steps: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    op_errors: int = 0
    unsupported: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    faults_skipped: int = 0
    daemon_restarts: int = 0
    commands: int = 0
    events: int = 0
    containers: int = 0
    exits_checked: int = 0
    violations: list[Violation] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tolerated: list[str] = field(default_factory=list)
    # After a violation: where the daemon's log and records were kept, and the log
    # lines that name the containers involved (CI keeps only the output of a run).
    evidence: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # The plan's arguments (to replay it) and where it ran.
    planned_ops: int = 0
    planned_faults: int = 0
    fault_kinds: list[str] = field(default_factory=list)
    host: str = ""
    timeline: list[StepRecord] = field(default_factory=list)
    degraded: list[Degradation] = field(default_factory=list)

    def summary(self) -> str:
        ops = sum(self.ops.values())
        faults = sum(self.faults.values())
        verdict = "OK" if not self.violations else f"{len(self.violations)} VIOLATIONS"
        return (
            f"{verdict}: driver={self.driver} runtime={self.runtime} seed={self.seed} "
            f"ops={ops} faults={faults} containers={self.containers} "
            f"exits-checked={self.exits_checked} events={self.events} "
            f"daemon-restarts={self.daemon_restarts} op-errors={self.op_errors} "
            f"time={self.seconds:.0f}s"
        )

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a crashtest result (format {data.get('format')!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in fields}
        kw["violations"] = [Violation(**v) for v in data.get("violations", [])]
        kw["timeline"] = [StepRecord(**s) for s in data.get("timeline", [])]
        kw["degraded"] = [Degradation(**d) for d in data.get("degraded", [])]
        return cls(**kw)

    @classmethod
    def loads(cls, text: str) -> Report:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("not a crashtest result (not a JSON object)")
        return cls.from_json(data)
