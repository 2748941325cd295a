"""Entry point of containerd-shim-pyshim-v1: dispatch of the parsed command line (shim.boot.flags).

`start` and `delete` run once per container, so this module imports nothing but
builtins at module level; each action imports what it needs when chosen.
"""

from __future__ import annotations

import os
import sys

from shim import RUNTIME_NAME
from shim.boot.flags import FLAGS, FlagError, HelpRequested, parse_flags, path_safe_id

TYPE_CHECKING = False  # typing costs ~3 ms at start-up; mypy honours this name

if TYPE_CHECKING:
    from typing import NoReturn

VERSION = "0.1.0"
REVISION = "pyshim"

# Actions that are a process of their own, run once per container: once their output
# is flushed, the interpreter's finalization (module teardown, ~2-3 ms) buys nothing.
QUICK_EXIT_ACTIONS = frozenset({"start", "delete"})


def usage(prog: str) -> str:
    lines = [f"Usage of {prog}:"]
    for name in sorted(FLAGS):
        is_bool, default, text = FLAGS[name]
        lines.append(f"  -{name}" if is_bool else f"  -{name} string")
        suffix = f' (default "{default}")' if not is_bool and default else ""
        lines.append(f"    \t{text}{suffix}")
    return "\n".join(lines) + "\n"


def version_text(prog: str) -> str:
    return (
        f"{os.path.basename(prog)}:\n"
        f"  Version:  {VERSION}\n"
        f"  Revision: {REVISION}\n"
        f"  Python version: {sys.version.split()[0]}\n"
        "\n"
    )


FEATURES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"


def run_info() -> int:
    """-info (containerd 2.x): RuntimeInfo as raw protobuf on stdout."""
    import subprocess

    from protocol import wire
    from shim.boot.info import features_binary

    options = sys.stdin.buffer.read()
    features = b""
    try:
        res = subprocess.run(
            [features_binary(options), "features"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        pass
    else:
        if res.returncode == 0:
            features = res.stdout
    version = wire.field_str(1, VERSION) + wire.field_str(2, REVISION)
    info = (
        wire.field_str(1, RUNTIME_NAME)
        + wire.field_bytes(2, version)
        # The options arrive as a serialized Any, which is exactly the embedded field.
        + wire.field_bytes(3, options)
        + (wire.field_bytes(4, wire.any_message(FEATURES_TYPE_URL, features)) if features else b"")
    )
    sys.stdout.buffer.write(info)
    sys.stdout.flush()
    return 0


def fail(message: str) -> int:
    """The Go shim's error convention: `<runtime>: <message>` on stderr, no newline, exit 1."""
    sys.stderr.write(f"{RUNTIME_NAME}: {message}")
    sys.stderr.flush()
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    prog = argv[0] if argv else "containerd-shim-pyshim-v1"
    try:
        opts = parse_flags(argv[1:])
    except HelpRequested:
        sys.stderr.write(usage(prog))
        return 0
    except FlagError as exc:
        sys.stderr.write(f"{exc}\n{usage(prog)}")
        return 2

    if opts.version:
        sys.stdout.write(version_text(prog))
        return 0
    if opts.info:
        return run_info()
    if opts.action == "template" and not opts.namespace:
        # Not a containerd action: the fork server `start` spawns (shim/template.py).
        from shim.boot.template import run_template

        return run_template(main)
    if not opts.namespace:
        return fail("shim namespace cannot be empty")

    action = opts.action
    if action in ("start", "delete") and not path_safe_id(opts.id):
        return fail(f"invalid shim id {opts.id!r}")
    try:
        if action == "start":
            from shim.boot.start import run_start

            return run_start(opts)
        if action == "delete":
            from shim.boot.delete import run_delete

            return run_delete(opts)
        if action == "":
            import signal

            # Importing the daemon takes a while; a SIGTERM meanwhile (containerd
            # giving up on a slow start) must still end in a clean shutdown.
            early: list[int] = []
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: early.append(signum))
            from shim.daemon import run_daemon

            return run_daemon(opts, early_signals=early)
    except Exception as exc:  # the contract is a message on stderr and exit 1
        return fail(str(exc) or type(exc).__name__)
    return fail(f"unknown action {action!r}")


def run() -> NoReturn:
    """The binary's entry point (the launcher, `python -m shim`): main() and exit."""
    code = main()
    try:
        action = parse_flags(sys.argv[1:]).action
    except (FlagError, HelpRequested):
        action = ""
    if action in QUICK_EXIT_ACTIONS:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            sys.exit(code)  # the regular exit reports it, as before
        os._exit(code)
    sys.exit(code)
