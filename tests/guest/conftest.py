"""Fixtures the guest tests share with the host's integration tests."""

from tests.integration.test_stats_oom import events

__all__ = ["events"]
