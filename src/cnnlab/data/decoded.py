"""The decode cache: each split decoded once per (input size, colour mode), shared by every stage.

Training reads images as one uint8 array (N, C, S, S), indexed a batch at a time. Building it means
decoding every stored JPEG/PNG and resizing it, which costs far more than an epoch of a small net
on small images; so it is built once, written to ``data/cache/decoded``, and memory-mapped by every
stage that reads that split at that size: ``scratch@scratch`` and ``scratch@regularized`` share
one, ``feature_extract``, ``fine_tune`` and ``evaluate`` another. A set larger than RAM is read
from the page cache as it is touched, instead of being held in each process's memory.

Each entry is ``<folder>-<split>-<size>px-<mode>-<key>.npy`` plus a ``.json`` saying what made it.
The key is a digest of the split's manifest and shards, the size and mode, and the code and Pillow
version that decode and resize: change any and a new entry is built (and the old one of the same
split, size and mode removed). The cache is not a DVC output (several stages share it); deleting
the folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL

from cnnlab.data import images as _images_module
from cnnlab.data import preprocess as _preprocess_module
from cnnlab.data.images import decode_stored
from cnnlab.data.preprocess import Mode, prepare_array
from cnnlab.data.shards import Group, content_digest, groups
from cnnlab.utils.files import atomic_write, remove_leftovers, write_json
from cnnlab.utils.progress import progress

_log = logging.getLogger(__name__)

# The code that turns stored bytes into pixels: an edit to it must not reuse arrays it made before.
_CODE = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (_images_module, _preprocess_module))
                       + PIL.__version__.encode()).hexdigest()[:12]


def cache_dir(split_dir: Path) -> Path:
    """Where the stages keep decoded arrays: ``cache/decoded`` beside the split folder (``data/``)."""
    return split_dir.parent / "cache" / "decoded"


def cpu_count() -> int:
    """The cores this process may use (a container's or taskset's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def decoded(folder: Path, split: str, *, mode: Mode, size: int, cache: Path) -> np.ndarray:
    """The split's images as uint8 (N, C, size, size), in manifest order, memory-mapped from the
    decode cache (built first when missing). Copy-on-write: writes stay in this process."""
    return open_array(decoded_path(folder, split, mode=mode, size=size, cache=cache), mode=mode, size=size)


def decoded_path(folder: Path, split: str, *, mode: Mode, size: int, cache: Path) -> Path:
    """The decode cache's file for the split at this size and mode, built first when missing."""
    key = hashlib.sha256(json.dumps([content_digest(folder, split), mode, size, _CODE]).encode()).hexdigest()[:16]
    prefix = f"{folder.name}-{split}-{size}px-{mode}-"
    path = cache / f"{prefix}{key}.npy"
    if path.exists():
        _log.info("decode cache: reusing %s", path)
        return path
    build(folder, split, path, mode=mode, size=size)
    for stale in cache.glob(f"{prefix}*"):  # the same split at this size and mode, from other data
        if not stale.name.startswith(f"{prefix}{key}"):
            stale.unlink(missing_ok=True)
    return path


def open_array(path: Path, *, mode: Mode, size: int) -> np.ndarray:
    """A decoded array file, memory-mapped copy-on-write, checked against what it should hold."""
    channels = 1 if mode == "L" else 3
    try:
        array = np.load(path, mmap_mode="c")
    except ValueError:  # numpy cannot map an array of no rows
        array = np.load(path)
    if array.ndim != 4 or array.shape[1:] != (channels, size, size) or array.dtype != np.uint8:
        raise ValueError(f"{path} holds {array.dtype} {array.shape}, not uint8 (N, {channels}, {size}, {size}): "
                         f"delete {path.parent} and run again")
    return array


def build(folder: Path, split: str, path: Path, *, mode: Mode, size: int) -> dict:
    """Decode every image of the split into ``path`` (written whole or not at all), using every core."""
    channels = 1 if mode == "L" else 3
    parts = groups(folder, split)
    n = sum(g.rows for g in parts)
    workers = min(cpu_count(), max(1, len(parts)))
    t0 = time.perf_counter()

    def fill(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, channels, size, size))
        bar = iter(progress(range(n), desc=f"decode {folder.name}/{split} at {size} px", total=n))

        def one(group: Group) -> int:
            for i, data in enumerate(group.read()):
                out[group.start + i] = prepare_array(decode_stored(data), mode=mode, size=size)
            return group.rows

        # Threads, not processes: Pillow lets go of the GIL while it decodes and resizes, and the
        # threads write straight into the one output array.
        with ThreadPoolExecutor(workers) as pool:
            for rows in pool.map(one, parts):
                for _ in range(rows):
                    next(bar, None)
        out.flush()

    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    atomic_write(path, fill)
    seconds = time.perf_counter() - t0
    meta = {"folder": str(folder), "split": split, "size": size, "mode": mode, "decoded": n, "workers": workers,
            "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 1) if seconds else None}
    write_json(path.with_suffix(".json"), meta)
    _log.info("decode cache: %d %s/%s images at %d px in %.1f s (%d threads) -> %s", n, folder.name, split, size,
              seconds, workers, path)
    return meta
