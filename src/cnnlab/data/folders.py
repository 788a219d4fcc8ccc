"""Find the classes and image files of an ImageFolder tree, with or without official splits."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cnnlab.data.walk import WalkResult, is_junk, walk_images

# Folder names that mean "an official split" rather than "a class" at the top of a tree, as in
# the pizza/steak/sushi archive (train/<class>/..., test/<class>/...).
_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

# Newlines, tabs and other control characters in a file name work on disk but not in an output
# name someone has to read or a shell has to quote: the stored copy gets "_" instead.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class FolderItem:
    path: Path  # the file on disk
    cls: str  # class (folder) name
    official_split: str | None  # "train" / "val" / "test" when the tree came split
    stem: str  # unique within (split, class): the path under the class folder, flattened


class LayoutError(ValueError):
    """The tree is not laid out as <class>/<image> (optionally under train/ val/ test/)."""


def _children(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not is_junk(p.name))


def find_root(folder: Path) -> Path:
    """Descend through single-folder wrappers (``archive/pizza_steak_sushi/...``) to the real root."""
    while True:
        kids = _children(folder)
        if len(kids) == 1 and kids[0].is_dir() and not kids[0].is_symlink():
            folder = kids[0]
        else:
            return folder


def scan_image_folder(folder: Path, extensions: frozenset[str], *,
                      follow_outside: bool = False) -> tuple[list[str], list[FolderItem], WalkResult]:
    """Classes (sorted), items, and what the walk skipped (`cnnlab.data.walk`: stray files, loops,
    links out of the folder, empty class folders).

    Files are chosen by extension only; whether they really are images is for the decoder to
    decide, so that a text file named ``.jpg`` ends up in the quarantine report, not ignored.
    A class folder with no image is skipped (and listed in ``empty_dirs``), not an error.
    """
    root = find_root(folder)
    walk = walk_images(root, extensions, follow_outside=follow_outside)
    tops = {p.name for p in _children(root) if p.is_dir()}
    if not tops:
        raise LayoutError(
            f"{root}: no class sub-folders; expected <class>/<image> with at least two classes"
        )
    is_split = all(t.lower() in _SPLIT_NAMES for t in tops) and "train" in {_SPLIT_NAMES[t.lower()] for t in tops}
    items: list[FolderItem] = []
    taken: set[tuple[str | None, str, str]] = set()
    for path in walk.files:
        parts = path.relative_to(root).parts
        split = _SPLIT_NAMES[parts[0].lower()] if is_split else None
        inner = parts[1:] if is_split else parts
        if len(inner) < 2:  # a file beside the class folders belongs to no class
            walk.stray.append(Path(*parts).as_posix())
            continue
        stem = base = _CONTROL.sub("_", "__".join(inner[1:]).replace(".", "_"))
        n = 1
        while (split, inner[0], stem) in taken:  # "a.b.jpg" and "a_b.jpg" flatten alike
            n += 1
            stem = f"{base}-{n}"
        taken.add((split, inner[0], stem))
        items.append(FolderItem(path, inner[0], split, stem))
    classes = sorted({it.cls for it in items})
    if len(classes) < 2:
        raise LayoutError(
            f"{root}: found {len(classes)} class folder(s) with images ({', '.join(classes) or 'none'}); "
            "a classifier needs at least two"
        )
    walk.stray.sort()
    return classes, items, walk
