"""Entry point of containerd-shim-pyshim-v1: Go-`flag` parsing and dispatch.

`start` and `delete` run once per container, so this module imports nothing but
builtins at module level; each action imports what it needs when chosen.
"""

from __future__ import annotations

import os
import sys

from shim import RUNTIME_NAME

TYPE_CHECKING = False  # typing costs ~3 ms at start-up; mypy honours this name

if TYPE_CHECKING:
    from typing import NoReturn

VERSION = "0.1.0"
REVISION = "pyshim"

# name -> (is_bool, default, usage); the order of this table is irrelevant, Go
# prints flags sorted by name.
FLAGS: dict[str, tuple[bool, str, str]] = {
    "address": (False, "", "grpc address back to main containerd"),
    "bundle": (False, "", "path to the bundle if not workdir"),
    "debug": (True, "false", "enable debug output in logs"),
    "debug-socket": (False, "", "debug socket path to serve"),
    "id": (False, "", "id of the task"),
    "info": (True, "false", "get the option protobuf from stdin, print the shim info and exit"),
    "namespace": (False, "", "namespace that owns the shim"),
    "publish-binary": (False, "containerd", "path to publish binary (used for publishing events)"),
    "socket": (False, "", "socket path to serve"),
    "v": (True, "false", "show the shim version and exit"),
    "version": (True, "false", "show the shim version and exit"),
}

# Actions that are a process of their own, run once per container: once their output
# is flushed, the interpreter's finalization (module teardown, ~2-3 ms) buys nothing.
QUICK_EXIT_ACTIONS = frozenset({"start", "delete"})

_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


class FlagError(Exception):
    """A command line Go's flag package rejects (exit 2 after the usage)."""


class HelpRequested(Exception):
    """-h / -help: Go prints the usage and exits 0."""


class Options:
    """Parsed command line. Strings default to empty, bools to False."""

    def __init__(self, values: dict[str, str], args: list[str]) -> None:
        self.namespace = values["namespace"]
        self.address = values["address"]
        self.publish_binary = values["publish-binary"]
        self.id = values["id"]
        self.bundle = values["bundle"]
        self.socket = values["socket"]
        self.debug_socket = values["debug-socket"]
        self.debug = values["debug"] == "true"
        self.version = values["v"] == "true" or values["version"] == "true"
        self.info = values["info"] == "true"
        self.args = args

    @property
    def action(self) -> str:
        return self.args[0] if self.args else ""


def parse_bool(value: str) -> bool:
    """strconv.ParseBool."""
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(value)


def parse_flags(argv: list[str]) -> Options:
    """Parse like Go's flag.FlagSet.Parse (ContinueOnError); argv excludes argv[0]."""
    values = {name: default for name, (_, default, _) in FLAGS.items()}
    args = list(argv)
    while args:
        s = args[0]
        if len(s) < 2 or s[0] != "-":
            break
        minuses = 1
        if s[1] == "-":
            minuses = 2
            if len(s) == 2:  # "--" ends the flags and is consumed
                args.pop(0)
                break
        name = s[minuses:]
        if not name or name[0] in "-=":
            raise FlagError(f"bad flag syntax: {s}")
        args.pop(0)
        has_value = "=" in name
        value = ""
        if has_value:
            name, value = name.split("=", 1)
        spec = FLAGS.get(name)
        if spec is None:
            if name in ("help", "h"):
                raise HelpRequested()
            raise FlagError(f"flag provided but not defined: -{name}")
        is_bool = spec[0]
        if is_bool:
            if has_value:
                try:
                    values[name] = "true" if parse_bool(value) else "false"
                except ValueError:
                    raise FlagError(
                        f'invalid boolean value "{value}" for -{name}: parse error'
                    ) from None
            else:
                values[name] = "true"
        else:
            if not has_value:
                if not args:
                    raise FlagError(f"flag needs an argument: -{name}")
                # Go takes the next argument whatever it looks like ("-id -x").
                value = args.pop(0)
            values[name] = value
    return Options(values, args)


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

    from shim.boot import _wire

    options = sys.stdin.buffer.read()
    features = b""
    try:
        res = subprocess.run(["runc", "features"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        pass
    else:
        if res.returncode == 0:
            features = res.stdout
    version = _wire.field_str(1, VERSION) + _wire.field_str(2, REVISION)
    info = (
        _wire.field_str(1, RUNTIME_NAME)
        + _wire.field_bytes(2, version)
        # The options arrive as a serialized Any, which is exactly the embedded field.
        + _wire.field_bytes(3, options)
        + (
            _wire.field_bytes(4, _wire.any_message(FEATURES_TYPE_URL, features))
            if features
            else b""
        )
    )
    sys.stdout.buffer.write(info)
    sys.stdout.flush()
    return 0


def path_safe_id(shim_id: str) -> bool:
    """containerd validates ids; this only keeps paths built from -id inside their parent."""
    return "/" not in shim_id and shim_id not in (".", "..")


def runs_start(opts: Options) -> bool:
    """Whether main() would hand these options to the `start` action itself (and not
    print a version, info or an error first): what a template may run for `start`."""
    return (
        opts.action == "start"
        and not opts.version
        and not opts.info
        and bool(opts.namespace)
        and path_safe_id(opts.id)
    )


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

        return run_template()
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
