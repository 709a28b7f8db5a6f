"""runtime/atomic.py: outputs appear whole or not at all, never a stray temporary."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from runtime.atomic import replace_dir, temp_dir_beside, write_atomic, written_atomic


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_replaces_the_target_with_umask_permissions(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    old_umask = os.umask(0o022)
    try:
        with write_atomic(target) as handle:
            handle.write(b"new")
            assert target.read_bytes() == b"old"  # nothing visible before the end
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("durable", [False, True])
def test_a_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path,
                                                                durable: bool) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="half way"), \
            write_atomic(target, "w", durable=durable, encoding="utf-8") as handle:
        handle.write("partial")
        raise RuntimeError("half way")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_named_temporaries_for_writers_that_want_a_path(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "product.h5"
    with written_atomic(target, durable=True) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".product.h5.")
        assert tmp.suffix == ".tmp" and tmp.exists() and tmp.stat().st_size == 0
        tmp.write_bytes(b"h5")
    assert target.read_bytes() == b"h5"
    with pytest.raises(KeyboardInterrupt), written_atomic(target) as tmp:
        tmp.write_bytes(b"cut")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"h5" and _leftovers(target.parent) == []


def test_missing_folder_is_made_or_refused(tmp_path: Path) -> None:
    with write_atomic(tmp_path / "a" / "b.txt", "w") as handle:
        handle.write("x")
    assert (tmp_path / "a" / "b.txt").read_text() == "x"
    with pytest.raises(FileNotFoundError), \
            write_atomic(tmp_path / "missing" / "c.txt", "w", make_parents=False):
        pass
    assert not (tmp_path / "missing").exists()
    with pytest.raises(ValueError, match="mode"), write_atomic(tmp_path / "d", "ab"):
        pass


def test_folder_swap(tmp_path: Path) -> None:
    outdir = tmp_path / "run"
    outdir.mkdir()
    (outdir / "old.txt").write_text("old")
    tmp = temp_dir_beside(outdir)
    assert tmp.parent == tmp_path and tmp.name.startswith(".run.tmp-") and tmp.is_dir()
    (tmp / "new.txt").write_text("new")
    replace_dir(tmp, outdir)
    assert sorted(p.name for p in outdir.iterdir()) == ["new.txt"]
    assert _leftovers(tmp_path) == []
    deeper = temp_dir_beside(tmp_path / "x" / "y")
    assert deeper.parent == tmp_path / "x"
