"""``python -m bench``: the shim benchmarks (see bench/README.md)."""

from bench.shims import main

raise SystemExit(main())
