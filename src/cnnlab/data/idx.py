"""Fashion-MNIST in its original IDX format: the files, their checksums and a strict reader."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np

# Slugs rather than Zalando's display names ("T-shirt/top") because they become folder names,
# MLflow labels and JSON keys in served predictions.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t-shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)

# MD5 of the *decompressed* IDX payloads, as published with the dataset (and used by torchvision
# before it switched to hashing the .gz). We check the payload rather than the .gz because Debian's
# `dataset-fashion-mnist` re-compressed the files: same bytes inside, different .gz checksums.
FASHION_MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}

_UBYTE = 0x08


class IdxFormatError(ValueError):
    """An IDX file whose header or length does not describe its contents."""


def payload_md5(path: Path) -> str:
    """MD5 of a gzip file's decompressed payload (a corrupt gzip raises IdxFormatError)."""
    digest = hashlib.md5()
    try:
        with gzip.open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except (OSError, EOFError) as exc:
        raise IdxFormatError(f"{path}: not a valid gzip file ({exc})") from None
    return digest.hexdigest()


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) unsigned-byte IDX file into an array of the shape its header declares."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise IdxFormatError(f"{path}: cannot read ({exc})") from None
    if len(data) < 4:
        raise IdxFormatError(f"{path}: too short to be an IDX file ({len(data)} bytes)")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != _UBYTE or not 1 <= ndim <= 4:
        raise IdxFormatError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise IdxFormatError(
            f"{path}: header declares shape {shape} ({expected} bytes) but holds {len(data) - header} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(raw_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images N x 28 x 28, labels N), "test": ...} from the four files in ``raw_dir``."""
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(raw_dir / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(raw_dir / f"{prefix}-labels-idx1-ubyte.gz")
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise IdxFormatError(
                f"{raw_dir}: {prefix} images {images.shape} and labels {labels.shape} do not match"
            )
        if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
            raise IdxFormatError(f"{raw_dir}: {prefix} labels hold a class id >= {len(FASHION_MNIST_CLASSES)}")
        out[split] = (images, labels)
    return out
