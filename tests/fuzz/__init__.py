"""Property-based fuzz targets for the wire and the task API.

Each target lives in ``targets.py`` as a hypothesis strategy plus a check; the suite
runs every target with a small budget (``test_fuzz.py``) and ``python -m tests.fuzz``
runs long campaigns of the same targets.
"""
