"""Runs a fuzz target for a given number of hypothesis cases (suite and campaigns)."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from hypothesis import HealthCheck, Phase, given, settings

from tests.fuzz.targets import TARGETS, ServiceFuzzer

__all__ = ["FuzzFinding", "RunResult", "run_random", "run_target"]


class FuzzFinding(AssertionError):
    """A check failed under the random engine; the message has the seed and the input."""


class RunResult(NamedTuple):
    target: str
    cases: int
    seconds: float


def run_target(name: str, cases: int, *, seed: int | None = None) -> RunResult:
    """Raise on the first (shrunk) finding; otherwise report how many cases ran."""
    target = TARGETS[name]
    count = 0
    with contextlib.ExitStack() as stack:
        check: Callable[[Any], None]
        if target.stateful:
            fuzzer = stack.enter_context(ServiceFuzzer())
            check = fuzzer.check
        else:
            assert target.check is not None
            check = target.check

        def body(case: Any) -> None:
            nonlocal count
            count += 1
            check(case)

        test = settings(
            max_examples=cases,
            database=None,
            deadline=None,
            derandomize=seed is None and cases <= 2000,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            print_blob=True,
        )(given(target.strategy)(body))
        if seed is not None:
            from hypothesis import seed as with_seed

            test = with_seed(seed)(test)
        start = time.monotonic()
        test()
    return RunResult(name, count, time.monotonic() - start)


def run_random(name: str, cases: int, *, seed: int = 0) -> RunResult:
    """The same check fed by ``randomgen`` (fast, no shrinking). Case ``i`` uses the
    generator seeded with ``(seed, i)``, so a finding replays on its own."""
    from tests.fuzz.randomgen import GENERATORS

    target = TARGETS[name]
    gen = GENERATORS[name]
    with contextlib.ExitStack() as stack:
        check: Callable[[Any], None]
        if target.stateful:
            check = stack.enter_context(ServiceFuzzer()).check
        else:
            assert target.check is not None
            check = target.check
        start = time.monotonic()
        for i in range(cases):
            case = gen(random.Random(f"{seed}:{i}"))
            try:
                check(case)
            except Exception as exc:
                raise FuzzFinding(
                    f"{name}: seed={seed} case={i}: {type(exc).__name__}: {exc}\ninput: {case!r}"
                ) from exc
    return RunResult(name, cases, time.monotonic() - start)
