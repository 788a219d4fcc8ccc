"""Find the classes and image files of an ImageFolder tree, with or without official splits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Folder names that mean "an official split" rather than "a class" at the top of a tree, as in
# the pizza/steak/sushi archive (train/<class>/..., test/<class>/...).
_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_JUNK = {"__MACOSX", "Thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class FolderItem:
    path: Path  # the file on disk
    cls: str  # class (folder) name
    official_split: str | None  # "train" / "val" / "test" when the tree came split
    stem: str  # unique within (split, class): the path under the class folder, flattened


class LayoutError(ValueError):
    """The tree is not laid out as <class>/<image> (optionally under train/ val/ test/)."""


def _children(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.name not in _JUNK)


def find_root(folder: Path) -> Path:
    """Descend through single-folder wrappers (``archive/pizza_steak_sushi/...``) to the real root."""
    while True:
        kids = _children(folder)
        if len(kids) == 1 and kids[0].is_dir() and not any(p.is_file() for p in kids):
            folder = kids[0]
        else:
            return folder


def _files_under(folder: Path, extensions: frozenset[str]) -> tuple[list[Path], int]:
    """Image-looking files under ``folder`` (recursive) and how many other files were skipped."""
    images, skipped = [], 0
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or any(part.startswith(".") or part in _JUNK for part in p.relative_to(folder).parts):
            continue
        if p.suffix.lower() in extensions:
            images.append(p)
        else:
            skipped += 1
    return images, skipped


def scan_image_folder(folder: Path, extensions: frozenset[str]) -> tuple[list[str], list[FolderItem], int]:
    """Classes (sorted), items, and the number of non-image files skipped.

    Files are chosen by extension only; whether they really are images is for the decoder to
    decide, so that a text file named ``.jpg`` ends up in the quarantine report, not ignored.
    """
    root = find_root(folder)
    tops = [p for p in _children(root) if p.is_dir()]
    if not tops:
        raise LayoutError(
            f"{root}: no class sub-folders; expected <class>/<image> with at least two classes"
        )
    split_dirs = {p: _SPLIT_NAMES.get(p.name.lower()) for p in tops}
    is_split = all(split_dirs.values()) and "train" in split_dirs.values()
    groups = [(p, split_dirs[p]) for p in tops] if is_split else [(root, None)]
    items: list[FolderItem] = []
    skipped = 0
    classes: set[str] = set()
    for group_dir, split in groups:
        for class_dir in (p for p in _children(group_dir) if p.is_dir()):
            files, n_skipped = _files_under(class_dir, extensions)
            skipped += n_skipped
            classes.add(class_dir.name)
            items.extend(
                FolderItem(f, class_dir.name, split, "__".join(f.relative_to(class_dir).parts).replace(".", "_"))
                for f in files
            )
    if len(classes) < 2:
        raise LayoutError(
            f"{root}: found {len(classes)} class folder(s) ({', '.join(sorted(classes)) or 'none'}); "
            "a classifier needs at least two"
        )
    return sorted(classes), items, skipped
