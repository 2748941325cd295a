"""Helpers shared by the test suites: rootfs, OCI bundles and images built locally."""
