"""Walk a user's image folder safely: each real directory once, no links out, only image files.

A user's folder is not a clean tree. It can hold a symlink loop (``dog/loop -> ..``), links to
files or folders elsewhere on the machine (which must not end up in ``data/`` or, through DVC, on
the team's remote), stray files (``notes.txt``, ``.DS_Store``), names that are not valid UTF-8,
and class folders with no image in them. `walk_images` visits each real directory once, follows
links only while they stay inside the folder (unless ``follow_outside`` says otherwise), and
returns the candidate image files with everything it skipped, for the data report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# Names that are never data: hidden files (.DS_Store, .git), macOS archive forks, Windows thumbnails.
JUNK = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})


def is_junk(name: str) -> bool:
    return name.startswith(".") or name in JUNK


@dataclass
class WalkResult:
    """What `walk_images` found under a root; paths in the lists are relative, '/'-separated."""

    files: list[Path] = field(default_factory=list)  # candidate images (by extension), sorted
    stray: list[str] = field(default_factory=list)  # other files: listed, never copied
    loops: list[str] = field(default_factory=list)  # links to a folder already walked (loops, aliases)
    outside: list[str] = field(default_factory=list)  # links that lead out of the root, not followed
    broken_links: list[str] = field(default_factory=list)  # links to nothing
    odd_names: list[str] = field(default_factory=list)  # not valid UTF-8: skipped (rename them)
    unreadable: list[str] = field(default_factory=list)  # folders we may not list (permissions)
    empty_dirs: list[str] = field(default_factory=list)  # folders with no candidate image below them

    def skipped(self) -> dict[str, list[str]]:
        """Every non-empty list of skipped things, by kind (for source.json and the report)."""
        return {k: getattr(self, k) for k in SKIPPED_KINDS if getattr(self, k)}


# The kinds of skipped things, in the order the report lists them.
SKIPPED_KINDS = ("stray", "loops", "outside", "broken_links", "odd_names", "unreadable", "empty_dirs")


def merge_skipped(*parts: dict[str, list[str]] | None) -> dict[str, list[str]]:
    """One ``skipped`` map from several walks (the download's and the split's), in a fixed order."""
    merged = {k: sorted({p for part in parts if part for p in part.get(k, [])}) for k in SKIPPED_KINDS}
    return {k: v for k, v in merged.items() if v}


def _rel(path: str, root: str) -> str:
    return Path(os.path.relpath(path, root)).as_posix().encode("utf-8", "backslashreplace").decode()


def _inside(target: str, root_real: str) -> bool:
    return target == root_real or target.startswith(root_real.rstrip(os.sep) + os.sep)


def walk_images(root: Path, extensions: frozenset[str], *, follow_outside: bool = False) -> WalkResult:
    """Candidate image files under ``root`` (recursive) and what was skipped, and why.

    A file is a candidate by its extension; whether it decodes is for `cnnlab.data.images` to say,
    so a text file named ``.jpg`` reaches the quarantine report rather than vanishing. The real
    tree is walked first; symlinks are then resolved: one that stays inside ``root`` is followed
    unless its folder was already walked (a loop, or a second name for a class folder: following
    ``cat/alias -> ../dog`` first would file dog's images under cat), one that leaves it is
    listed in ``outside`` and not followed unless ``follow_outside``.
    """
    root = Path(root)
    root_real = os.path.realpath(root)
    out = WalkResult()
    seen: set[tuple[int, int]] = set()
    walked: list[str] = []  # every folder walked, relative
    links: list[os.DirEntry] = []  # resolved after the real tree

    def visit(folder: str) -> None:
        st = os.stat(folder)
        seen.add((st.st_dev, st.st_ino))
        walked.append(_rel(folder, str(root)))
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except PermissionError:
            out.unreadable.append(_rel(folder, str(root)))
            return
        for entry in entries:
            if is_junk(entry.name):
                continue
            try:
                entry.name.encode("utf-8")
            except UnicodeEncodeError:  # undecodable bytes in the name: the manifests are UTF-8
                out.odd_names.append(_rel(entry.path, str(root)))
                continue
            if entry.is_symlink():
                links.append(entry)
            else:
                take(entry)

    def take(entry: os.DirEntry) -> None:
        if entry.is_dir():  # follows a link that passed the checks in the loop below
            visit(entry.path)
        elif entry.is_file():
            if Path(entry.name).suffix.lower() in extensions:
                out.files.append(Path(entry.path))
            else:
                out.stray.append(_rel(entry.path, str(root)))
        # sockets, FIFOs, devices: never data, never opened

    visit(str(root))
    while links:
        entry = links.pop(0)
        rel = _rel(entry.path, str(root))
        target = os.path.realpath(entry.path)
        if not os.path.exists(target):
            out.broken_links.append(rel)
        elif not follow_outside and not _inside(target, root_real):
            out.outside.append(rel)
        elif os.path.isdir(target) and (os.stat(target).st_dev, os.stat(target).st_ino) in seen:
            out.loops.append(rel)
        else:
            take(entry)
    out.files.sort()
    # A walked folder with no candidate below it; the outermost name says it all.
    holding = {p.as_posix() for f in out.files for p in f.relative_to(root).parents}
    empty = [d for d in walked if d not in holding and d not in out.unreadable]
    out.empty_dirs = sorted(d for d in empty if not any(d.startswith(e + "/") for e in empty))
    return out
