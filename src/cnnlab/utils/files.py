"""Crash-safe file output: nothing a stage wrote before is lost or half-replaced."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cnnlab.utils.run_guard import pid_alive, temp_prefix


@contextmanager
def staged_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty temp dir beside ``dest``; when the block succeeds it replaces ``dest``.

    On an exception the temp dir is removed and an existing ``dest`` is left as it was; what a
    killed earlier attempt left beside ``dest`` is removed first.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dest)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=temp_prefix(dest.name)))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; outputs get the usual mode
    try:
        yield tmp
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{tmp.name}")
            dest.rename(old)
        tmp.rename(dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Have ``write`` fill a temp file beside ``path``, then ``os.replace`` it there: readers see the
    old file or the new one, never half of one. A write cut short by SIGKILL leaves a temp file
    named after this process (`temp_prefix`), which the stage's watcher or the next write removes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name))
    os.close(fd)
    try:
        # mkstemp makes it owner-only (0600); on Windows chmod only sets the read-only flag
        os.chmod(tmp, 0o666 & ~_umask())
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write` of UTF-8 text."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def remove_leftovers(dest: Path) -> None:
    """Remove the temp files and folders a SIGKILLed write of ``dest`` left beside it
    (``.<name>.tmp-<pid>-*``, ``.<name>.old-*``) whose writer is gone: no stage declares them as
    outputs, so nothing else would (`cnnlab.utils.run_guard.watch_files` does right after a SIGKILL)."""
    for leftover in [*dest.parent.glob(f".{dest.name}.tmp-*"), *dest.parent.glob(f".{dest.name}.old-*")]:
        writer = re.search(r"\.tmp-(\d+)-", leftover.name)
        if writer and int(writer.group(1)) != os.getpid() and pid_alive(int(writer.group(1))):
            continue  # a live process is writing it
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(path: Path, fieldnames: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


_CHUNK = 1 << 20


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of ``path``, streamed in 1 MiB chunks so big files never sit in memory."""
    h = hashlib.new(algorithm)
    _update(h, path)
    return h.hexdigest()


def files_digest(*paths: Path) -> str:
    """Short fingerprint of the files' contents, in order: equal digest = same data."""
    h = hashlib.sha256()
    for path in paths:
        _update(h, path)
    return h.hexdigest()[:16]


def _update(h: "hashlib._Hash", path: Path) -> None:
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
