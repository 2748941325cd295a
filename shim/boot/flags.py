"""The shim binary's command line, parsed as Go's `flag` package parses it.

Apart from the dispatch (shim.boot.cli) so that whoever needs the parsed options
(start, delete, the template's hand-over, the daemon) imports no actions with them.
Builtins only: `start` and `delete` run once per container.
"""

from __future__ import annotations

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
