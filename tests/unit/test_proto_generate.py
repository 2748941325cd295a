"""The committed *_pb2 modules must match their .proto sources."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "protocol.proto.generate", "--check"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_committed_code_is_fresh() -> None:
    result = run_check(REPO)
    assert result.returncode == 0, result.stderr


def copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(
        REPO / "protocol" / "proto",
        root / "protocol" / "proto",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy(REPO / "protocol" / "__init__.py", root / "protocol" / "__init__.py")
    return root


def test_check_reports_edited_proto(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    proto = root / "protocol" / "proto" / "runtimeoptions" / "v1" / "api.proto"
    proto.write_text(proto.read_text().replace("bytes config_body = 3;", "bytes config_body = 4;"))
    result = run_check(root)
    assert result.returncode == 1
    assert "stale: protocol/proto/runtimeoptions/v1/api_pb2.py" in result.stderr


def test_check_reports_missing_and_orphan_files(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    (root / "protocol" / "proto" / "types" / "mount_pb2.pyi").unlink()
    (root / "protocol" / "proto" / "types" / "__init__.py").unlink()
    (root / "protocol" / "proto" / "gone_pb2.py").write_text("")
    result = run_check(root)
    assert result.returncode == 1
    assert "missing: protocol/proto/types/mount_pb2.pyi" in result.stderr
    assert "missing: protocol/proto/types/__init__.py" in result.stderr
    assert "orphan (no .proto): protocol/proto/gone_pb2.py" in result.stderr


def test_regenerate_restores_files(tmp_path: Path) -> None:
    root = copy_tree(tmp_path)
    target = root / "protocol" / "proto" / "ttrpc_pb2.py"
    original = target.read_bytes()
    target.write_text("# damaged\n")
    subprocess.run(
        [sys.executable, "-m", "protocol.proto.generate"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        check=True,
        timeout=120,
    )
    assert target.read_bytes() == original
    assert run_check(root).returncode == 0
