"""The tests' private containerd: crashtest's (Debian's 1.6, or 2.3:
tests/support/containerd2.py), plus what only pyshim's tests need: a shim fork
template directory of its own, stopped on close, and containerd's Tasks service
over gRPC."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from crashtest import containerd as base
from crashtest.containerd import (
    CGROUP_ROOT,
    DEBIAN,
    RUNC_ROOT,
    ContainerdError,
    Host,
    _config,
    socket_accepts,
)
from tests.support.template import spare_pids, stop_templates, template_pids

__all__ = [
    "CGROUP_ROOT",
    "RUNC_ROOT",
    "Containerd",
    "ContainerdError",
    "_config",
    "private_containerd",
    "socket_accepts",
]


class Containerd(base.Containerd):
    def __init__(
        self,
        *,
        namespace: str | None = None,
        cri: bool = False,
        extra_config: Callable[[Path], str] | None = None,
        tmp: Path | None = None,
        log_level: str = "debug",
        start: bool = True,
        template_dir: Path | None = None,
        host: Host = DEBIAN,
    ) -> None:
        """As crashtest's; ``template_dir``: the shims' template directory, when several
        containerds are to share one."""
        self._template_dir = template_dir
        super().__init__(
            namespace=namespace,
            cri=cri,
            extra_config=extra_config,
            tmp=tmp,
            log_level=log_level,
            start=start,
            host=host,
        )

    @property
    def template_dir(self) -> Path:
        # Our own shim template (shim/boot/template.py), so close() can stop it.
        return self._template_dir or self.tmp / "template"

    def env(self) -> dict[str, str]:
        env = super().env()
        env.setdefault("PYSHIM_TEMPLATE_DIR", str(self.template_dir))
        return env

    def template_pids(self) -> list[int]:
        """Live shim templates serving from our template dir."""
        return template_pids(self.template_dir)

    def spare_pids(self) -> list[int]:
        """The templates' idle pre-forked daemons."""
        return spare_pids(self.template_dir)

    def _stop_helpers(self) -> None:
        # Only the templates: one shared with another instance is stopped by whoever
        # gave it its directory (a sweep by marker would also stop a shared one).
        stop_templates(self.template_dir)

    def tasks_call(self, method: str, request: bytes, timeout: float = 60.0) -> bytes:
        """containerd's own Tasks service over gRPC, messages as serialized protobuf:
        what ctr cannot send (Update before ctr 2.x, the Go client's option types)."""
        import grpc

        with grpc.insecure_channel(f"unix://{self.address}") as channel:
            call = channel.unary_unary(
                f"/containerd.services.tasks.v1.Tasks/{method}",
                request_serializer=lambda data: data,
                response_deserializer=lambda data: data,
            )
            response: bytes = call(
                request, metadata=[("containerd-namespace", self.namespace)], timeout=timeout
            )
            return response


@contextlib.contextmanager
def private_containerd(
    *, namespace: str | None = None, cri: bool = False, host: Host = DEBIAN
) -> Iterator[Containerd]:
    c = Containerd(namespace=namespace, cri=cri, host=host)
    try:
        yield c
    finally:
        c.close()
