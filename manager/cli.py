"""pyshim: the command line for pyshimd."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, TypeVar, cast

from manager import units
from manager.apiclient import BlockingManagerClient, ManagerClient, ManagerNotRunning
from manager.streams import POLL_INTERVAL, LogTail, forward_stdin
from protocol.proto.lite import to_dict
from protocol.proto.manager.v1 import manager_lite as lite
from protocol.ttrpc.status import Code, TtrpcError

if TYPE_CHECKING:
    import asyncio
    import json
    from collections.abc import Callable, Coroutine, Sequence

    from manager.logtimes import LineTimes
    from protocol.proto.lite import WireMessage
else:

    class _Lazy:
        """A module imported on first use: json, only for --json and inspect. (Messages
        are LiteMessages, manager_lite: no command imports protobuf, ~25 % of a `pyshim
        run`'s own CPU and ~40 % of a `pyshim ps`'s.)"""

        def __init__(self, name: str) -> None:
            self._name = name

        def __getattr__(self, attr: str) -> Any:
            module = __import__(self._name, fromlist=["_"])
            return getattr(module, attr)

    json = _Lazy("json")

T = TypeVar("T")
# docker's convention: the manager failed, as opposed to the container's own status.
EXIT_MANAGER_ERROR = 125


class UsageError(Exception):
    """Bad arguments: argparse's message and exit status 2."""


class CommandError(Exception):
    """The request was understood but cannot be done (exit status 125)."""


class NeedsEventLoop(Exception):
    """Raised by a command run on the blocking client before it has changed anything,
    when it turns out to need asyncio after all (run pulling a missing image)."""


def parse_size(text: str) -> int:
    """``67108864``, ``64m``, ``64MiB``, ``1g`` (powers of 1024, as docker)."""
    try:
        return units.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_restart(text: str) -> tuple[str, int]:
    """``no``, ``always``, ``unless-stopped``, ``on-failure`` or ``on-failure:N``."""
    policy, sep, count = text.partition(":")
    if policy in ("no", "always", "unless-stopped") and not sep:
        return policy, 0
    if policy == "on-failure":
        if not sep:
            return policy, 0
        if count.isdigit() and int(count) > 0:
            return policy, int(count)
    raise argparse.ArgumentTypeError(
        f"invalid restart policy {text!r}: no, on-failure[:N], always, unless-stopped"
    )


def parse_publish(text: str) -> lite.PortMapping:
    """``HOST:CONTAINER[/tcp|udp]`` or ``IP:HOST:CONTAINER[/tcp|udp]``."""
    spec, _, proto = text.partition("/")
    proto = proto or "tcp"
    parts = spec.split(":")
    host_ip = parts.pop(0) if len(parts) == 3 else ""
    if len(parts) != 2 or proto not in ("tcp", "udp"):
        raise argparse.ArgumentTypeError(
            f"invalid -p {text!r}: expected HOST:CONTAINER[/tcp|udp], e.g. 8080:80"
        )
    try:
        host, container = int(parts[0]), int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid -p {text!r}: ports are numbers") from None
    if not (0 < host < 65536 and 0 < container < 65536):
        raise argparse.ArgumentTypeError(f"invalid -p {text!r}: ports are 1-65535")
    return lite.PortMapping(
        host_port=host, container_port=container, protocol=proto, host_ip=host_ip
    )


def parse_volume(text: str) -> lite.MountRequest:
    """``-v /host:/dest[:ro|rw]`` (a bind) or ``-v NAME:/dest[:ro|rw]`` (a named volume)."""
    parts = text.split(":")
    mode = parts.pop() if len(parts) == 3 else ""
    if len(parts) != 2 or not parts[0] or not parts[1] or mode not in ("", "ro", "rw"):
        raise argparse.ArgumentTypeError(
            f"invalid -v {text!r}: expected HOST-DIR:DEST[:ro] or VOLUME:DEST[:ro]"
        )
    source, dest = parts
    if not dest.startswith("/"):
        raise argparse.ArgumentTypeError(f"invalid -v {text!r}: {dest} is not an absolute path")
    kind = "bind" if source.startswith(("/", ".")) else "volume"
    if kind == "bind":
        source = os.path.abspath(source)
    return lite.MountRequest(type=kind, source=source, destination=dest, readonly=mode == "ro")


def parse_tmpfs(text: str) -> lite.MountRequest:
    """``--tmpfs /dest[:size=64m,mode=1777,noexec]``."""
    dest, _, options = text.partition(":")
    if not dest.startswith("/"):
        raise argparse.ArgumentTypeError(f"invalid --tmpfs {text!r}: {dest} is not absolute")
    return lite.MountRequest(type="tmpfs", destination=dest, options=options)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_since(text: str) -> int:
    """docker's --since: a duration before now (Go's form: 1h30m, 45s), an RFC 3339
    time, or unix seconds; returned as unix ns."""
    t = text.strip()
    if t and _DURATION.sub("", t) == "" and _DURATION.match(t):
        secs = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION.findall(t))
        return time.time_ns() - int(secs * 1e9)
    try:
        return int(float(t) * 1e9)
    except ValueError:
        pass
    try:
        import datetime

        when = datetime.datetime.fromisoformat(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid --since {text!r}: e.g. 10m, 1h30m, 2026-12-06T20:00:00Z, 1765051200"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # a time without a zone is local, as docker reads it
    return int(when.timestamp() * 1e9)


def parse_tail(text: str) -> int:
    if text == "all":
        return -1
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"invalid --tail {text!r}: a number of lines or all")
    return int(text)


def parse_timeout(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r}: whole seconds, e.g. 10")
    return int(text)


def parse_cpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid cpus {text!r} (e.g. 0.5, 2)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("cpus must be positive")
    return value


def parse_env(text: str) -> str:
    key, sep, _ = text.partition("=")
    if not key:
        raise argparse.ArgumentTypeError(f"invalid --env {text!r}: expected K=V")
    # docker: a bare K takes its value from our own environment.
    if not sep:
        if key not in os.environ:
            raise argparse.ArgumentTypeError(f"--env {key}: not set here; give K=V")
        return f"{key}={os.environ[key]}"
    return text


def parse_signal(text: str) -> int:
    t = text.upper()
    if t.isdigit():
        num = int(t)
        if not 0 <= num < signal.NSIG:
            raise argparse.ArgumentTypeError(f"invalid signal {text!r}")
        return num
    name = t if t.startswith("SIG") else "SIG" + t
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown signal {text!r}") from None


if TYPE_CHECKING:
    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    _SubParsers = argparse._SubParsersAction


class _Commands(_SubParsers):
    """The subcommands, each one's parser made (and its arguments added) only when it
    is the command given: making every command's parser, each with its own gettext
    lookups, help formatter and arguments, cost each `pyshim run` ~20 % of its own
    CPU. `pyshim --help` lists them from their help alone."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Any]] = {}

    def command(
        self, name: str, **kwargs: Any
    ) -> Callable[[Callable[[argparse.ArgumentParser], None]], None]:
        """Decorator: the function adds command ``name``'s arguments to its parser;
        ``kwargs`` are add_parser's."""

        def register(fill: Callable[[argparse.ArgumentParser], None]) -> None:
            # The listing entry add_parser would make, now; the parser when used.
            self._choices_actions.append(
                self._ChoicesPseudoAction(name, (), kwargs.pop("help", None))
            )
            # A key now: argparse checks a command against these names before the call.
            self._name_parser_map[name] = cast(argparse.ArgumentParser, None)
            self._pending[name] = (fill, kwargs)

        return register

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        pending = self._pending.pop(values[0], None) if values else None
        if pending is not None:
            fill, kwargs = pending
            del self._name_parser_map[values[0]]  # add_parser refuses a name it has
            fill(self.add_parser(values[0], **kwargs))
        super().__call__(parser, namespace, values, option_string)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyshim", description="run containers with pyshimd")
    p.add_argument("--run-dir", help="pyshimd's run dir (env PYSHIM_RUN_DIR, /run/pyshim)")
    p.add_argument("--state-dir", help="pyshimd's state dir (env PYSHIM_STATE_DIR)")
    sub = cast(
        _Commands,
        p.add_subparsers(dest="command", required=True, metavar="COMMAND", action=_Commands),
    )

    @sub.command("run", help="create and start a container")
    def _(run: argparse.ArgumentParser) -> None:
        run.add_argument("--rm", action="store_true", help="remove it once it exited")
        run.add_argument("-d", "--detach", action="store_true", help="print its id and return")
        run.add_argument("-t", "--tty", action="store_true", help="give it a terminal")
        run.add_argument("-i", "--interactive", action="store_true", help="keep its stdin open")
        run.add_argument("--name")
        run.add_argument("-e", "--env", action="append", default=[], type=parse_env, metavar="K=V")
        run.add_argument("-w", "--workdir", default="")
        run.add_argument("-u", "--user", default="", metavar="UID[:GID]")
        run.add_argument(
            "-m",
            "--memory",
            type=parse_size,
            default=0,
            metavar="SIZE",
            help="limit, e.g. 512m, 1g",
        )
        run.add_argument("--cpus", type=parse_cpus, default=0.0)
        run.add_argument(
            "--restart",
            type=parse_restart,
            default=("no", 0),
            metavar="POLICY",
            help="no (default), on-failure[:N], always, unless-stopped",
        )
        run.add_argument(
            "--network",
            "--net",
            default="bridge",
            choices=["bridge", "host", "none"],
            help="bridge (default: pyshimd's bridge, NAT to the outside), host, none",
        )
        run.add_argument(
            "-p",
            "--publish",
            action="append",
            default=[],
            type=parse_publish,
            metavar="HOST:CONTAINER[/PROTO]",
            help="publish a container port on the host (bridge network)",
        )
        run.add_argument(
            "-v",
            "--volume",
            action="append",
            default=[],
            type=parse_volume,
            metavar="SRC:DEST[:ro]",
            help="bind a host dir (absolute or ./relative SRC) or a named volume (SRC=NAME)",
        )
        run.add_argument(
            "--tmpfs",
            action="append",
            default=[],
            type=parse_tmpfs,
            metavar="DEST[:OPTS]",
            help="a tmpfs, e.g. /cache:size=64m,mode=1777",
        )
        run.add_argument(
            "--stop-signal", default="", metavar="SIGNAL", help="for stop (default: the image's)"
        )
        run.add_argument("--rootfs", default="", help="use this directory as the root")
        run.add_argument("image_and_cmd", nargs=argparse.REMAINDER, metavar="[IMAGE] -- CMD")

    @sub.command("exec", help="run a command in a running container")
    def _(ex: argparse.ArgumentParser) -> None:
        ex.add_argument("-t", "--tty", action="store_true")
        ex.add_argument("-i", "--interactive", action="store_true")
        ex.add_argument("-e", "--env", action="append", default=[], type=parse_env, metavar="K=V")
        ex.add_argument("-w", "--workdir", default="")
        ex.add_argument("-u", "--user", default="", metavar="UID[:GID]")
        ex.add_argument("container")
        ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD")

    @sub.command("attach", help="connect to a container's output (and stdin)")
    def _(at: argparse.ArgumentParser) -> None:
        at.add_argument("container")

    @sub.command("ps", help="list containers")
    def _(ps: argparse.ArgumentParser) -> None:
        ps.add_argument("-a", "--all", action="store_true", help="include stopped containers")
        ps.add_argument("--json", action="store_true")

    @sub.command("logs", help="print a container's output")
    def _(lg: argparse.ArgumentParser) -> None:
        lg.add_argument("-f", "--follow", action="store_true")
        lg.add_argument(
            "-n", "--tail", type=parse_tail, default=-1, metavar="N", help="only the last N lines"
        )
        lg.add_argument(
            "-t", "--timestamps", action="store_true", help="when each line was written"
        )
        lg.add_argument(
            "--since",
            type=parse_since,
            default=0,
            metavar="WHEN",
            help="lines written since: 10m, 1h30m, 2026-12-06T20:00:00Z or unix seconds",
        )
        lg.add_argument("container")

    @sub.command("kill", help="signal a container")
    def _(k: argparse.ArgumentParser) -> None:
        k.add_argument("-s", "--signal", type=parse_signal, default=int(signal.SIGKILL))
        k.add_argument("container")

    @sub.command("wait", help="print a container's exit status once it exited")
    def _(w: argparse.ArgumentParser) -> None:
        w.add_argument("container")

    @sub.command("rm", help="remove containers")
    def _(rm: argparse.ArgumentParser) -> None:
        rm.add_argument("-f", "--force", action="store_true", help="kill it first if running")
        rm.add_argument("containers", nargs="+", metavar="container")

    @sub.command("inspect", help="a container's details as JSON")
    def _(ins: argparse.ArgumentParser) -> None:
        ins.add_argument("container")

    @sub.command("stop", help="stop containers: the stop signal, then SIGKILL after the timeout")
    def _(st: argparse.ArgumentParser) -> None:
        st.add_argument(
            "-t", "--time", type=parse_timeout, default=-1, metavar="SECONDS", help="default 10"
        )
        st.add_argument("containers", nargs="+", metavar="container")

    @sub.command("start", help="start stopped containers again (same id, same log)")
    def _(sa: argparse.ArgumentParser) -> None:
        sa.add_argument(
            "--checkpoint",
            default="",
            metavar="DIR",
            help="continue from this checkpoint (pyshim checkpoint --output DIR) instead of "
            "running the command anew; one container only",
        )
        sa.add_argument("containers", nargs="+", metavar="container")

    @sub.command(
        "checkpoint",
        help="save a running container's processes to a directory (CRIU); it stops unless "
        "--leave-running; `pyshim start --checkpoint DIR` continues it",
    )
    def _(cp: argparse.ArgumentParser) -> None:
        cp.add_argument(
            "-o",
            "--output",
            required=True,
            metavar="DIR",
            help="where CRIU writes its images: a new or empty directory",
        )
        cp.add_argument(
            "--leave-running", action="store_true", help="keep the container running afterwards"
        )
        cp.add_argument("container")

    @sub.command("restart", help="stop, then start containers")
    def _(rs: argparse.ArgumentParser) -> None:
        rs.add_argument(
            "-t", "--time", type=parse_timeout, default=-1, metavar="SECONDS", help="default 10"
        )
        rs.add_argument("containers", nargs="+", metavar="container")

    @sub.command("pause", help="freeze every process of containers")
    def _(pa: argparse.ArgumentParser) -> None:
        pa.add_argument("containers", nargs="+", metavar="container")

    @sub.command("unpause", help="thaw paused containers")
    def _(up: argparse.ArgumentParser) -> None:
        up.add_argument("containers", nargs="+", metavar="container")

    @sub.command("stats", help="CPU, memory, pids and network I/O of containers")
    def _(sts: argparse.ArgumentParser) -> None:
        sts.add_argument("--no-stream", action="store_true", help="one sample, then exit")
        sts.add_argument("--json", action="store_true", help="with --no-stream: as JSON")
        sts.add_argument("containers", nargs="*", metavar="container", help="default: all running")

    @sub.command("top", help="the processes of a container")
    def _(tp: argparse.ArgumentParser) -> None:
        tp.add_argument("--json", action="store_true")
        tp.add_argument("container")

    @sub.command("pull", help="fetch an image from a registry (OCI distribution API)")
    def _(pl: argparse.ArgumentParser) -> None:
        pl.add_argument("ref", metavar="IMAGE", help="e.g. busybox, registry.example:5000/app:1")

    @sub.command("login", help="keep credentials for a registry (checked first)")
    def _(lo: argparse.ArgumentParser) -> None:
        lo.add_argument("registry", metavar="HOST[:PORT]")
        lo.add_argument("-u", "--username", required=True)
        lo.add_argument("-p", "--password", help="prefer --password-stdin")
        lo.add_argument(
            "--password-stdin", action="store_true", help="read the password from stdin"
        )

    @sub.command("volume", help="manage named volumes")
    def _(vol: argparse.ArgumentParser) -> None:
        vsub = vol.add_subparsers(dest="volume_command", required=True, metavar="COMMAND")
        vc = vsub.add_parser("create", help="create a volume (run -v NAME:/dir also does)")
        vc.add_argument("name")
        vls = vsub.add_parser("ls", help="list volumes")
        vls.add_argument("--json", action="store_true")
        vrm = vsub.add_parser("rm", help="remove volumes no container uses")
        vrm.add_argument("names", nargs="+", metavar="name")

    @sub.command("image", help="manage images")
    def _(img: argparse.ArgumentParser) -> None:
        isub = img.add_subparsers(dest="image_command", required=True, metavar="COMMAND")
        imp = isub.add_parser("import", help="import an OCI image layout or docker-archive tar")
        imp.add_argument("archive")
        imp.add_argument("--ref", default="", help="name for an image the archive leaves unnamed")
        ils = isub.add_parser("ls", help="list images")
        ils.add_argument("--json", action="store_true")
        irm = isub.add_parser("rm", help="remove an image")
        irm.add_argument("ref")

    return p


def split_image_and_cmd(words: Sequence[str], rootfs: str) -> tuple[str, list[str]]:
    """``[IMAGE] [--] CMD...``: with ``--`` the image is whatever precedes it."""
    words = list(words)
    if "--" in words:
        i = words.index("--")
        before, cmd = words[:i], words[i + 1 :]
        if len(before) > 1:
            raise UsageError(f"unexpected arguments before --: {' '.join(before[1:])}")
        image = before[0] if before else ""
    elif rootfs or not words:
        image, cmd = "", words
    else:
        image, cmd = words[0], words[1:]
    if image and rootfs:
        raise UsageError("give either an IMAGE or --rootfs, not both")
    if not image and not cmd:
        raise UsageError("no command given: pyshim run [IMAGE] -- CMD...")
    return image, cmd


def _strip_dashdash(words: Sequence[str]) -> list[str]:
    words = list(words)
    return words[1:] if words[:1] == ["--"] else words


# ---------------------------------------------------------------------- commands


async def _interactive_session(
    mc: ManagerClient,
    *,
    container: str,
    exec_id: str,
    log_path: str,
    stdin_path: str,
    tty: bool,
    from_end: bool,
) -> lite.WaitResponse:
    """Show output, feed stdin, follow the terminal size, until the process exits."""
    import asyncio

    from manager.terminal import raw_mode, terminal_size

    loop = asyncio.get_running_loop()
    tail = LogTail(log_path, sys.stdout.fileno(), from_end=from_end)
    done = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    use_tty = tty and os.isatty(sys.stdin.fileno())

    async def resize() -> None:
        cols, rows = terminal_size(sys.stdin.fileno())
        if cols and rows:
            with contextlib.suppress(TtrpcError):
                await mc.empty(
                    "Resize",
                    lite.ResizeRequest(
                        container=container, exec_id=exec_id, width=cols, height=rows
                    ),
                )

    async def close_stdin() -> None:
        with contextlib.suppress(TtrpcError):
            await mc.empty("CloseIO", lite.CloseIORequest(container=container, exec_id=exec_id))

    with raw_mode(sys.stdin.fileno()) if use_tty else contextlib.nullcontext():
        if use_tty:
            await resize()
            loop.add_signal_handler(
                signal.SIGWINCH, lambda: tasks.append(asyncio.create_task(resize()))
            )
        if stdin_path:
            tasks.append(
                asyncio.create_task(forward_stdin(sys.stdin.fileno(), stdin_path, close_stdin))
            )
        follower = asyncio.create_task(tail.follow(done))
        try:
            result = await mc.wait(container, exec_id)
        finally:
            done.set()
            await follower
            tail.close()
            if use_tty:
                loop.remove_signal_handler(signal.SIGWINCH)
            for t in tasks:
                t.cancel()
    return result


def _output_until_exit(
    mc: BlockingManagerClient, container: str, tail: LogTail
) -> lite.WaitResponse:
    """_interactive_session without a terminal or stdin, on the blocking client: the log
    is copied while Wait is pending, then once more (the shim drains a process's
    output into the log before it reports the exit)."""
    result = mc.wait_while(container, "", tail.pump, POLL_INTERVAL)
    tail.pump()
    tail.flush()
    return result


def _report_exit(res: lite.WaitResponse) -> None:
    if res.exit_reason:
        sys.stderr.write(f"pyshim: {res.exit_reason}\n")


async def cmd_run(mc: ManagerClient, args: argparse.Namespace) -> int:
    image, cmd = split_image_and_cmd(args.image_and_cmd, args.rootfs)
    rootfs = ""
    if args.rootfs:
        from pathlib import Path  # here: pathlib is ~8 % of a `pyshim run` without --rootfs

        rootfs = str(Path(args.rootfs).absolute())
    cfg = lite.ContainerConfig(
        name=args.name or "",
        args=cmd,
        env=args.env,
        workdir=args.workdir,
        user=args.user,
        memory_bytes=args.memory,
        cpus=args.cpus,
        image=image,
        rootfs=rootfs,
        terminal=args.tty,
        stdin=args.interactive,
        # Foreground --rm is done here, after the last output has been read.
        auto_remove=args.rm and args.detach,
        restart_policy=args.restart[0],
        restart_max=args.restart[1],
        stop_signal=args.stop_signal,
        network=args.network,
        ports=args.publish,
        mounts=[*args.volume, *args.tmpfs],
    )
    if args.rm and args.restart[0] != "no":
        raise UsageError("--rm and --restart cannot be combined")
    if args.tty:
        from manager.terminal import terminal_size

        cfg.tty_width, cfg.tty_height = terminal_size(sys.stdin.fileno())
    try:
        resp = await mc.call("Run", lite.RunRequest(config=cfg), lite.RunResponse)
    except TtrpcError as exc:
        if not (image and exc.code == Code.NOT_FOUND and exc.message.startswith("image ")):
            raise
        if mc.blocking:
            raise NeedsEventLoop from exc  # nothing was made: main starts over
        # docker's way: an image that is not here is pulled, then run.
        sys.stderr.write(f"Unable to find image {image!r} locally\n")
        await _pull(mc, image)
        resp = await mc.call("Run", lite.RunRequest(config=cfg), lite.RunResponse)
    c = resp.container
    if args.detach:
        print(c.id)
        return 0
    try:
        if isinstance(mc, BlockingManagerClient):
            tail = LogTail(c.log_path, sys.stdout.fileno())
            try:
                res = _output_until_exit(mc, c.id, tail)
            finally:
                tail.close()
        else:
            res = await _interactive_session(
                mc,
                container=c.id,
                exec_id="",
                log_path=c.log_path,
                stdin_path=c.stdin_path,
                tty=args.tty,
                from_end=False,
            )
    finally:
        if args.rm:
            with contextlib.suppress(TtrpcError):
                await mc.empty("Remove", lite.RemoveRequest(container=c.id, force=True))
    _report_exit(res)
    return res.exit_status


async def cmd_exec(mc: ManagerClient, args: argparse.Namespace) -> int:
    cmd = _strip_dashdash(args.cmd)
    if not cmd:
        raise UsageError("no command given: pyshim exec NAME -- CMD...")
    req = lite.ExecRequest(
        container=args.container,
        args=cmd,
        env=args.env,
        workdir=args.workdir,
        user=args.user,
        terminal=args.tty,
        stdin=args.interactive,
    )
    if args.tty:
        from manager.terminal import terminal_size

        req.tty_width, req.tty_height = terminal_size(sys.stdin.fileno())
    resp = await mc.call("Exec", req, lite.ExecResponse)
    res = await _interactive_session(
        mc,
        container=resp.container_id,
        exec_id=resp.exec_id,
        log_path=resp.log_path,
        stdin_path=resp.stdin_path,
        tty=args.tty,
        from_end=False,
    )
    return res.exit_status


async def cmd_attach(mc: ManagerClient, args: argparse.Namespace) -> int:
    c = (await mc.inspect(args.container)).container
    if c.exited:
        raise CommandError(f"container {c.name} is not running (exit status {c.exit_status})")
    res = await _interactive_session(
        mc,
        container=c.id,
        exec_id="",
        log_path=c.log_path,
        stdin_path=c.stdin_path,
        tty=c.terminal,
        from_end=True,
    )
    _report_exit(res)
    return res.exit_status


def _line_times(path: str) -> LineTimes:
    from manager.logtimes import LineTimes

    return LineTimes.for_log(path)


def _ago(ts_ns: int) -> str:
    secs = max(0, int(time.time() - ts_ns / 1e9))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit} ago"
    return f"{secs}s ago"


def status_text(c: lite.Container) -> str:
    oom = " OOMKilled" if c.oom_killed else ""
    if c.exited:
        ago = _ago(c.exited_at.ns())
        if c.status == "restarting":
            return f"restarting ({c.exit_status}){oom} {ago}"
        return f"exited ({c.exit_status}){oom} {ago}"
    return c.status + oom


def container_json(c: lite.Container) -> dict[str, object]:
    """Proto field names, every field (as `--json` and `inspect` show them)."""
    d = to_dict(c)
    if not c.exited:
        d.pop("exited_at", None)
    return d


async def cmd_ps(mc: ManagerClient, args: argparse.Namespace) -> int:
    resp = await mc.call("List", lite.ListRequest(all=args.all), lite.ListResponse)
    if args.json:
        print(json.dumps([container_json(c) for c in resp.containers], indent=2))
        return 0
    rows = [("CONTAINER ID", "NAME", "IMAGE", "COMMAND", "CREATED", "STATUS", "PID")]
    for c in resp.containers:
        command = " ".join(c.command)
        rows.append(
            (
                c.id[:12],
                c.name,
                c.image or "-",
                command if len(command) <= 30 else command[:27] + "...",
                _ago(c.created_at.ns()),
                status_text(c),
                str(c.pid) if c.pid and not c.exited else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


async def cmd_logs(mc: ManagerClient, args: argparse.Namespace) -> int:
    assert isinstance(mc, BlockingManagerClient)  # _runs_blocking: -f too
    c = (await mc.inspect(args.container)).container
    stamped = args.timestamps or args.since
    tail = LogTail(
        c.log_path,
        sys.stdout.fileno(),
        times=_line_times(c.log_path) if stamped else None,
        timestamps=args.timestamps,
        since_ns=args.since,
    )
    if args.tail >= 0:
        tail.seek_last_lines(args.tail)
    try:
        if not args.follow or c.exited:
            tail.pump()
            tail.flush()
        else:
            _output_until_exit(mc, c.id, tail)
    finally:
        tail.close()
    return 0


async def cmd_kill(mc: ManagerClient, args: argparse.Namespace) -> int:
    await mc.empty("Kill", lite.KillRequest(container=args.container, signal=args.signal))
    return 0


async def cmd_wait(mc: ManagerClient, args: argparse.Namespace) -> int:
    res = await mc.wait(args.container)
    _report_exit(res)
    print(res.exit_status)
    return 0


async def cmd_rm(mc: ManagerClient, args: argparse.Namespace) -> int:
    rc = 0
    for ref in args.containers:
        try:
            await mc.empty("Remove", lite.RemoveRequest(container=ref, force=args.force))
        except TtrpcError as exc:
            sys.stderr.write(f"pyshim: {exc.message}\n")
            rc = EXIT_MANAGER_ERROR
            continue
        print(ref)
    return rc


async def _each(
    mc: ManagerClient, refs: Sequence[str], method: str, make: Callable[[str], WireMessage]
) -> int:
    """One request per container, docker's way: print each that worked, report the rest."""
    rc = 0
    for ref in refs:
        try:
            await mc.call(method, make(ref), _response_type(method))
        except TtrpcError as exc:
            sys.stderr.write(f"pyshim: {exc.message}\n")
            rc = EXIT_MANAGER_ERROR
            continue
        print(ref)
    return rc


def _response_type(method: str) -> type[WireMessage]:
    """What _each's methods answer: Start and Restart the new run, the others Empty."""
    return lite.StartResponse if method in ("Start", "Restart") else lite.Empty


async def cmd_stop(mc: ManagerClient, args: argparse.Namespace) -> int:
    return await _each(
        mc,
        args.containers,
        "Stop",
        lambda r: lite.StopRequest(container=r, timeout_seconds=args.time),
    )


async def cmd_start(mc: ManagerClient, args: argparse.Namespace) -> int:
    checkpoint = ""
    if args.checkpoint:
        if len(args.containers) != 1:
            raise UsageError("--checkpoint restores one container: name only one")
        checkpoint = os.path.abspath(args.checkpoint)
    return await _each(
        mc,
        args.containers,
        "Start",
        lambda r: lite.StartRequest(container=r, checkpoint=checkpoint),
    )


async def cmd_checkpoint(mc: ManagerClient, args: argparse.Namespace) -> int:
    output = os.path.abspath(args.output)
    req = lite.CheckpointRequest(
        container=args.container, output=output, leave_running=args.leave_running
    )
    await mc.empty("Checkpoint", req)
    print(output)
    return 0


async def cmd_restart(mc: ManagerClient, args: argparse.Namespace) -> int:
    return await _each(
        mc,
        args.containers,
        "Restart",
        lambda r: lite.StopRequest(container=r, timeout_seconds=args.time),
    )


async def cmd_pause(mc: ManagerClient, args: argparse.Namespace) -> int:
    return await _each(mc, args.containers, "Pause", lambda r: lite.PauseRequest(container=r))


async def cmd_unpause(mc: ManagerClient, args: argparse.Namespace) -> int:
    return await _each(mc, args.containers, "Unpause", lambda r: lite.PauseRequest(container=r))


async def cmd_inspect(mc: ManagerClient, args: argparse.Namespace) -> int:
    resp = await mc.inspect(args.container)
    out = container_json(resp.container)
    out["spec"] = json.loads(resp.spec_json) if resp.spec_json else None
    print(json.dumps(out, indent=2))
    return 0


async def cmd_image(mc: ManagerClient, args: argparse.Namespace) -> int:
    if args.image_command == "import":
        path = os.path.abspath(args.archive)
        if not os.path.isfile(path):
            raise UsageError(f"{args.archive}: no such file")
        req = lite.ImageImportRequest(archive_path=path, ref=args.ref)
        resp = await mc.call("ImageImport", req, lite.ImageImportResponse)
        for image in resp.images:
            print(f"{image.ref} {image.digest}")
        return 0
    if args.image_command == "ls":
        listed = await mc.call("ImageList", lite.ImageListRequest(), lite.ImageListResponse)
        if args.json:
            print(json.dumps([to_dict(im) for im in listed.images], indent=2))
            return 0
        _table(
            [("REF", "DIGEST", "LAYERS", "SIZE")]
            + [
                (im.ref, im.digest[:19], str(len(im.layers)), _size(im.size))
                for im in listed.images
            ]
        )
        return 0
    await mc.empty("ImageRemove", lite.ImageRemoveRequest(ref=args.ref))
    print(args.ref)
    return 0


# How often live stats refresh (docker's too).
STATS_INTERVAL = 1.0
# --no-stream's two samples for CPU %, this far apart.
STATS_SAMPLE_GAP = 0.5


def _cpu_percent(before: lite.ContainerStats | None, now: lite.ContainerStats) -> float:
    """Share of one CPU used between two samples (docker's: 200% = two CPUs busy)."""
    if before is None:
        return 0.0
    dt = now.read_at.ns() - before.read_at.ns()
    used = now.cpu_usage_ns - before.cpu_usage_ns
    return 100.0 * used / dt if dt > 0 and used > 0 else 0.0


def _stats_rows(
    before: dict[str, lite.ContainerStats], now: Sequence[lite.ContainerStats]
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for s in now:
        d = to_dict(s)
        d["cpu_percent"] = round(_cpu_percent(before.get(s.id), s), 2)
        d["memory_percent"] = (
            round(100.0 * s.memory_usage / s.memory_limit, 2) if s.memory_limit else None
        )
        rows.append(d)
    return rows


def _stats_table(before: dict[str, lite.ContainerStats], now: Sequence[lite.ContainerStats]) -> str:
    rows = [("CONTAINER ID", "NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "NET I/O", "PIDS")]
    for s, d in zip(now, _stats_rows(before, now), strict=True):
        limit = _size(s.memory_limit) if s.memory_limit else "-"
        mem_pct = d["memory_percent"]
        rows.append(
            (
                s.id[:12],
                s.name,
                f"{d['cpu_percent']:.2f}%",
                f"{_size(s.memory_usage)} / {limit}",
                f"{mem_pct:.2f}%" if mem_pct is not None else "-",
                f"{_size(s.net_rx_bytes)} / {_size(s.net_tx_bytes)}",
                str(s.pids),
            )
        )
    return _format_table(rows)


async def cmd_stats(mc: ManagerClient, args: argparse.Namespace) -> int:
    # On the blocking client (_runs_blocking): it only waits between calls.
    if args.json and not args.no_stream:
        raise UsageError("--json needs --no-stream")
    req = lite.StatsRequest(containers=args.containers)

    async def sample() -> list[lite.ContainerStats]:
        return list((await mc.call("Stats", req, lite.StatsResponse)).stats)

    first = await sample()
    if args.no_stream:
        time.sleep(STATS_SAMPLE_GAP)
        now = await sample()
        before = {s.id: s for s in first}
        if args.json:
            print(json.dumps(_stats_rows(before, now), indent=2))
        else:
            sys.stdout.write(_stats_table(before, now))
        return 0
    clear = "\x1b[2J\x1b[H" if os.isatty(sys.stdout.fileno()) else ""
    before = {s.id: s for s in first}
    while True:
        time.sleep(STATS_INTERVAL)
        now = await sample()
        sys.stdout.write(clear + _stats_table(before, now))
        sys.stdout.flush()
        before = {s.id: s for s in now}


async def cmd_top(mc: ManagerClient, args: argparse.Namespace) -> int:
    resp = await mc.call("Top", lite.TopRequest(container=args.container), lite.TopResponse)
    if args.json:
        print(json.dumps([to_dict(p) for p in resp.processes], indent=2))
        return 0
    _table(
        [("PID", "PPID", "USER", "COMMAND")]
        + [(str(p.pid), str(p.ppid), p.user, p.command) for p in resp.processes]
    )
    return 0


# How often a pull's progress is redrawn on a terminal.
PROGRESS_INTERVAL = 0.2


def _bar(lp: lite.LayerProgress, width: int = 30) -> str:
    name = lp.digest.removeprefix("sha256:")[:12]
    if lp.state in ("downloading", "waiting") and lp.size:
        filled = min(width, width * lp.done // lp.size)
        bar = "=" * filled + (">" if filled < width else "") + " " * (width - filled - 1)
        return f"{name}: {lp.state:<11} [{bar[:width]}] {_size(lp.done)}/{_size(lp.size)}"
    return f"{name}: {lp.state}"


async def _pull(mc: ManagerClient, ref: str) -> lite.Image:
    """Pull, drawing a bar per layer while it runs when stdout is a terminal."""
    import asyncio

    pulling = asyncio.create_task(mc.call("Pull", lite.PullRequest(ref=ref), lite.PullResponse))
    if os.isatty(sys.stdout.fileno()):
        drawn = 0
        while not pulling.done():
            await asyncio.wait({pulling}, timeout=PROGRESS_INTERVAL)
            prog = await mc.call(
                "PullProgress", lite.PullProgressRequest(ref=ref), lite.PullProgressResponse
            )
            lines = [_bar(lp) for lp in prog.layers]
            sys.stdout.write(("\x1b[F" * drawn) + "".join(f"\x1b[2K{ln}\n" for ln in lines))
            sys.stdout.flush()
            drawn = len(lines)
    image = (await pulling).image
    print(f"{image.ref} {image.digest}")
    # Before a run's output, which goes to the file descriptor, not through print.
    sys.stdout.flush()
    return image


async def cmd_pull(mc: ManagerClient, args: argparse.Namespace) -> int:
    await _pull(mc, args.ref)
    return 0


async def cmd_login(mc: ManagerClient, args: argparse.Namespace) -> int:
    if args.password_stdin == (args.password is not None):
        raise UsageError("give the password with exactly one of -p and --password-stdin")
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else args.password
    req = lite.LoginRequest(registry=args.registry, username=args.username, password=password)
    await mc.empty("Login", req)
    print("Login Succeeded")
    return 0


async def cmd_volume(mc: ManagerClient, args: argparse.Namespace) -> int:
    if args.volume_command == "create":
        v = await mc.call("VolumeCreate", lite.VolumeCreateRequest(name=args.name), lite.Volume)
        print(v.name)
        return 0
    if args.volume_command == "ls":
        listed = await mc.call("VolumeList", lite.VolumeListRequest(), lite.VolumeListResponse)
        if args.json:
            print(json.dumps([to_dict(v) for v in listed.volumes], indent=2))
            return 0
        _table(
            [("NAME", "USED BY", "MOUNTPOINT")]
            + [(v.name, ",".join(v.used_by) or "-", v.mountpoint) for v in listed.volumes]
        )
        return 0
    return await _each(mc, args.names, "VolumeRemove", lambda n: lite.VolumeRemoveRequest(name=n))


def _format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join(
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() + "\n" for r in rows
    )


def _table(rows: Sequence[Sequence[str]]) -> None:
    sys.stdout.write(_format_table(rows))


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TiB"


COMMANDS = {
    "run": cmd_run,
    "exec": cmd_exec,
    "attach": cmd_attach,
    "ps": cmd_ps,
    "logs": cmd_logs,
    "kill": cmd_kill,
    "wait": cmd_wait,
    "rm": cmd_rm,
    "inspect": cmd_inspect,
    "stop": cmd_stop,
    "start": cmd_start,
    "checkpoint": cmd_checkpoint,
    "restart": cmd_restart,
    "pause": cmd_pause,
    "unpause": cmd_unpause,
    "volume": cmd_volume,
    "stats": cmd_stats,
    "pull": cmd_pull,
    "login": cmd_login,
    "top": cmd_top,
    "image": cmd_image,
}


# Commands that do something else while a call is pending (feed stdin, follow the
# terminal's size, draw a pull's progress): they need an event loop. The others make
# calls one after another (a log is copied while Wait is pending by the blocking
# client's own idle callback) and run on the blocking client, without asyncio (its
# import is ~30 ms of a CLI that takes ~100 ms). `run` too when nothing but output is
# to be moved (no -i, no -t).
EVENT_LOOP_COMMANDS = frozenset({"exec", "attach", "pull"})


def _runs_blocking(args: argparse.Namespace) -> bool:
    if args.command == "run":
        return not (args.interactive or args.tty)
    return args.command not in EVENT_LOOP_COMMANDS


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine whose every await is answered at once (BlockingManagerClient's
    calls) to its end; one that would wait for an event loop is a bug."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("a command on the blocking client waited for an event loop")


async def _dispatch(args: argparse.Namespace, *, blocking: bool = False) -> int:
    mc = (
        BlockingManagerClient.connect_blocking(args.run_dir, args.state_dir)
        if blocking
        else await ManagerClient.connect(args.run_dir, args.state_dir)
    )
    try:
        return await COMMANDS[args.command](mc, args)
    finally:
        mc.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if _runs_blocking(args):
            with contextlib.suppress(NeedsEventLoop):
                return drive(_dispatch(args, blocking=True))
        import asyncio

        return asyncio.run(_dispatch(args))
    except UsageError as exc:
        parser.error(str(exc))
    except (ManagerNotRunning, CommandError) as exc:
        sys.stderr.write(f"pyshim: {exc}\n")
    except TtrpcError as exc:
        sys.stderr.write(f"pyshim: {exc.message}\n")
    except KeyboardInterrupt:
        return 130
    return EXIT_MANAGER_ERROR


if __name__ == "__main__":
    sys.exit(main())
