"""Crash-safe writes (cnnlab.utils.files) on real files, including where the OS lacks os.fchmod."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cnnlab.utils.files import atomic_write_text, staged_dir


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("has_fchmod", [True, False], ids=["posix", "no-fchmod"])
def test_atomic_write_replaces_the_file_with_the_usual_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, has_fchmod: bool
) -> None:
    if not has_fchmod:  # Windows before Python 3.13
        monkeypatch.delattr(os, "fchmod")
    path = tmp_path / "out" / "metrics.json"
    atomic_write_text(path, "old\n")
    atomic_write_text(path, "new ✓\n")
    assert path.read_text(encoding="utf-8") == "new ✓\n"
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left behind
    # Not mkstemp's owner-only 0600: other users and tools read stage outputs.
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()


def test_a_killed_write_s_leftovers_are_removed_by_the_next_write_and_nothing_else(tmp_path: Path):
    """SIGKILL between mkdtemp/mkstemp and the rename leaves .<name>.tmp-* (or .old-*) beside the
    output; no stage declares them, so the next write must clear them."""
    dest, other = tmp_path / "out", tmp_path / "other.json"
    for leftover in (".out.tmp-abc", ".out.old-.out.tmp-def"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "part.bin").write_bytes(b"x" * 10)
    (tmp_path / ".other.json.tmp-123").write_text("half")
    (tmp_path / ".unrelated.tmp-1").write_text("not ours")
    with staged_dir(dest) as tmp:
        (tmp / "a.txt").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.tmp-123", ".unrelated.tmp-1", "out"]
    atomic_write_text(other, "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".unrelated.tmp-1", "other.json", "out"]
