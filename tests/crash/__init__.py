"""Regression tests for what the crash tool (crashtest/) found, and for its checks."""
