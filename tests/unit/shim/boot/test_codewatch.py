"""shim/boot/codewatch.py: which changes make a template stale, through real inotify."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.boot import codewatch, quickstart, templateclient
from shim.boot.codewatch import CodeWatch
from shim.sys import syscalls


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    root = tmp_path / "root"
    for rel in ("shim", "shim/sub", "shim/__pycache__", "protocol"):
        (root / rel).mkdir(parents=True)
    (root / "shim" / "a.py").write_text("x = 1\n")
    (root / "shim" / "sub" / "b.py").write_text("y = 2\n")
    site = tmp_path / "lib" / "site-packages"
    site.mkdir(parents=True)
    (site / "dep-1.0.dist-info").mkdir()
    interpreter = tmp_path / "python"
    interpreter.write_bytes(b"ELF")
    yield root, site, interpreter


def _watch(tree: tuple[Path, Path, Path]) -> CodeWatch:
    root, site, interpreter = tree
    return CodeWatch(
        codewatch.code_dirs(str(root), ("shim", "protocol")),
        codewatch.site_dirs([str(site), str(site.parent)]),
        [str(interpreter)],
    )


def test_code_dirs_skip_bytecode_caches(tree: tuple[Path, Path, Path]) -> None:
    root = tree[0]
    assert list(codewatch.code_dirs(str(root), ("shim", "protocol"))) == [
        str(root / "shim"),
        str(root / "shim" / "sub"),
        str(root / "protocol"),
    ]


@pytest.mark.parametrize(
    "change",
    [
        "edit a.py",
        "touch b.py",
        "new c.py",
        "remove a.py",
        "rename a.py",
        "new extension",
        "new package",
        "remove package",
        "new dist-info",
        "remove dist-info",
        "replace interpreter",
        "edit interpreter",
    ],
)
def test_what_makes_the_code_stale(tree: tuple[Path, Path, Path], change: str) -> None:
    root, site, interpreter = tree
    watch = _watch(tree)
    try:
        assert not watch.changed()
        shim = root / "shim"
        if change == "edit a.py":
            with open(shim / "a.py", "a") as f:
                f.write("z = 3\n")
        elif change == "touch b.py":
            os.utime(shim / "sub" / "b.py", (1, 1))
        elif change == "new c.py":
            (shim / "c.py").write_text("")
        elif change == "remove a.py":
            (shim / "a.py").unlink()
        elif change == "rename a.py":
            (shim / "a.py").rename(shim / "sub" / "a.py")
        elif change == "new extension":
            (root / "protocol" / "fast.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
        elif change == "new package":
            (shim / "pkg").mkdir()
        elif change == "remove package":
            shutil.rmtree(shim / "sub")
        elif change == "new dist-info":
            (site / "dep-2.0.dist-info").mkdir()
        elif change == "remove dist-info":
            (site / "dep-1.0.dist-info").rmdir()
        elif change == "replace interpreter":
            new = interpreter.with_name("python.new")
            new.write_bytes(b"ELF2")
            new.rename(interpreter)
        elif change == "edit interpreter":
            with open(interpreter, "ab") as f:
                f.write(b"!")
        assert watch.changed()
        assert watch.changed()  # stays stale
    finally:
        watch.close()


def test_what_leaves_the_code_alone(tree: tuple[Path, Path, Path]) -> None:
    root, site, interpreter = tree
    watch = _watch(tree)
    try:
        shim = root / "shim"
        (shim / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"pyc")
        (shim / "notes.txt").write_text("x")
        (shim / ".a.py.swp").write_text("x")
        (site / "other_module").mkdir()
        (site / "loose.py").write_text("")
        (shim / "a.py").read_text()
        interpreter.read_bytes()
        assert not watch.changed()
    finally:
        watch.close()


def test_a_watch_that_cannot_be_made_is_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_inotify(flags: int = 0) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(syscalls, "inotify_init1", no_inotify)
    assert codewatch.watch_code(str(tmp_path)) is None


def test_a_missing_directory_closes_the_fd(tmp_path: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        CodeWatch([str(tmp_path / "missing")], [], [])
    assert set(os.listdir("/proc/self/fd")) == before


def test_the_real_install_is_watched() -> None:
    watch = codewatch.watch_code(quickstart.package_root())
    assert watch is not None
    try:
        assert not watch.changed()
    finally:
        watch.close()


def test_every_directory_of_the_real_code_is_watched_and_digested() -> None:
    """The packages' sub-packages (shim/boot, shim/task, ...) are code too: a change in
    any of them must reach both the watch and the template's code key."""
    root = Path(quickstart.package_root())
    files = {
        str(path.relative_to(root))
        for top in templateclient.CODE_PACKAGES
        for path in (root / top).rglob("*")
        if path.suffix in templateclient.CODE_EXTENSIONS and "__pycache__" not in path.parts
    }
    subpackages = {str(Path(f).parent) for f in files if f.count("/") > 1}
    assert {"shim/boot", "shim/task", "shim/io", "shim/records", "shim/sys"} <= subpackages
    watched = set(codewatch.code_dirs(str(root), templateclient.CODE_PACKAGES))
    assert {str(root / d) for d in subpackages} <= watched
    digested = {
        name
        for top in templateclient.CODE_PACKAGES
        for name, _ in templateclient._code_files(str(root), top)
    }
    assert files == digested
