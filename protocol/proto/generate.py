"""Regenerate the committed protobuf modules from the .proto sources.

    python -m protocol.proto.generate           # rewrite *_pb2.py / *_pb2.pyi in place
    python -m protocol.proto.generate --check   # exit 1 listing stale or missing files

Protos are compiled with the repository root as the only project include path,
so ``protocol/proto/types/mount.proto`` is registered under that name and the
generated imports read ``from protocol.proto.types import mount_pb2``.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi")


def proto_sources() -> list[Path]:
    """All .proto files, repo-relative, sorted so protoc sees a stable order."""
    return sorted(p.relative_to(REPO_ROOT) for p in PROTO_DIR.rglob("*.proto"))


def expected_outputs(sources: Sequence[Path]) -> list[Path]:
    outs: list[Path] = []
    for src in sources:
        stem = src.with_suffix("")
        outs.extend(stem.parent / (stem.name + suffix) for suffix in GENERATED_SUFFIXES)
    return outs


def package_dirs(sources: Sequence[Path]) -> list[Path]:
    """Every directory from protocol/proto down to each proto needs __init__.py."""
    root = PROTO_DIR.relative_to(REPO_ROOT)
    dirs: set[Path] = set()
    for src in sources:
        d = src.parent
        while d != root.parent and d != Path("."):
            dirs.add(d)
            d = d.parent
    return sorted(dirs)


def run_protoc(sources: Sequence[Path], out_dir: Path) -> None:
    # Imported lazily: grpc_tools is a dev dependency, never needed at runtime.
    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(str(s) for s in sources),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit status {rc}")


def stale_files(sources: Sequence[Path], fresh_dir: Path) -> list[str]:
    problems: list[str] = []
    expected = set(expected_outputs(sources))
    for rel in sorted(expected):
        committed = REPO_ROOT / rel
        if not committed.exists():
            problems.append(f"missing: {rel}")
        elif not filecmp.cmp(committed, fresh_dir / rel, shallow=False):
            problems.append(f"stale: {rel}")
    for suffix in GENERATED_SUFFIXES:
        for existing in PROTO_DIR.rglob("*" + suffix):
            rel = existing.relative_to(REPO_ROOT)
            if rel not in expected:
                problems.append(f"orphan (no .proto): {rel}")
    for d in package_dirs(sources):
        if not (REPO_ROOT / d / "__init__.py").exists():
            problems.append(f"missing: {d / '__init__.py'}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protocol.proto.generate")
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if any generated file differs from a fresh build",
    )
    opts = parser.parse_args(argv)
    sources = proto_sources()
    with tempfile.TemporaryDirectory(prefix="pyshim-protoc-") as tmp:
        fresh = Path(tmp)
        run_protoc(sources, fresh)
        if opts.check:
            problems = stale_files(sources, fresh)
            for line in problems:
                print(line, file=sys.stderr)
            if problems:
                print("run: python -m protocol.proto.generate", file=sys.stderr)
                return 1
            return 0
        for rel in expected_outputs(sources):
            target = REPO_ROOT / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(fresh / rel, target)
        for d in package_dirs(sources):
            init = REPO_ROOT / d / "__init__.py"
            if not init.exists():
                init.write_text("")
    return 0


if __name__ == "__main__":
    sys.exit(main())
