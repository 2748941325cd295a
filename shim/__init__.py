"""pyshim's shim: see docs/internals.md for the packages and which may import which."""

# The runtime's name, as containerd knows it (io.containerd.<name>.<version>). Here,
# in the package every shim module loads anyway, so that even the builtins-only
# quick path (shim.boot.quickstart) can use it for free.
RUNTIME_NAME = "io.containerd.pyshim.v1"
