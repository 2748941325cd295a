"""Crash-recovery harness: a seeded random container workload with faults injected at
random points, through containerd (any runtime) or the pyshim manager, followed by
invariant checks (exits known, reported once, in order; no zombies; no leaks).

    python -m tests.crash --driver manager --seed 1 --ops 100 --faults 20
"""
