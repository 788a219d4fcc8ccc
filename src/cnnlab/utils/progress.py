"""Progress bars that suit both a terminal and a log file (DVC and CI capture stage output)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "img",
             disable: bool = False) -> Iterator[T]:
    """A tqdm bar on stderr; redrawn at most every 0.2 s on a terminal, every 15 s in a log.
    ``disable``: no bar (e.g. on every training process but the first)."""
    interactive = sys.stderr.isatty()
    return iter(tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, disable=disable,
                     mininterval=0.2 if interactive else 15.0, dynamic_ncols=interactive))
