"""Crash-recovery testing for containerd runtimes (`pyshim-crashtest`).

A seeded random workload of container lifecycles runs through containerd (any runtime)
or the pyshim manager, with faults injected at random points (containerd and shims
SIGKILLed or stopped, clients killed mid-call, a full disk, a slow runc), followed by
invariant checks: every exit known, reported once and right; events in order; no
zombies, orphans or leftovers. Nothing here imports a runtime's code: it drives
containerd, ctr, pyshimd and pyshim as a user would.

    pyshim-crashtest --compare io.containerd.runc.v2 io.containerd.pyshim.v1 --seed 1
"""
