"""The same photo twice: exact copies (same pixels) and near copies (resized or re-encoded).

Real folders hold all three kinds of trouble: a photo saved twice in one class (it counts double),
the same photo under two classes (a conflicting label: one of them is wrong) and copies that a
random split would put in two splits (leakage: the test then measures partly on training images).
Exact copies are found by a digest of the decoded pixels, so a PNG and a lossless re-save of it
match, and EXIF metadata does not matter. Near copies are found on 16x16 grey thumbnails
(`near_groups`).

Why not perceptual hashes (`imagehash`'s dHash/pHash): a hash is a lookup key, and a few bits
flip on a JPEG re-save of a textured photo; on generated photos, matching either of two 64-bit
dHashes found 104 of 241 re-saved or downscaled copies; the thumbnail search finds 240.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy.spatial import cKDTree  # scipy comes with scikit-learn, a dependency already

# Near copies: 16x16 thumbnails within this many grey levels of each other on average. Measured
# (bench/photo_folder.py photos, re-saved at JPEG quality 60, downscaled 2x or 4x): 240 of 241
# copies found at 2 (239 at 1); on all 70,000 Fashion-MNIST images 2 gives 24 groups of 54
# look-alike garments (3 gives 62 groups, 1 gives 14), 3.9 s.
NEAR_LEVELS = 2.0


def pixel_digest(image: Image.Image) -> str:
    """Identifies the decoded pixels (mode, size and values), not the file's bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def thumbnail(image: Image.Image) -> bytes:
    """The 16x16 grey thumbnail the near-copy search compares (256 bytes per image)."""
    return image.convert("L").resize((16, 16), Image.Resampling.LANCZOS, reducing_gap=2.0).tobytes()


def exact_groups(digests: Sequence[str]) -> list[list[int]]:
    """Indices sharing a pixel digest, groups of two or more, each sorted, in order of first member."""
    by = defaultdict(list)
    for i, d in enumerate(digests):
        by[d].append(i)
    return [g for g in by.values() if len(g) > 1]


def near_groups(thumbs: Sequence[bytes], digests: Sequence[str]) -> list[list[int]]:
    """Groups of images whose 16x16 thumbnails differ by at most NEAR_LEVELS grey levels on average
    but whose pixels differ (`thumbnail`'s output of each).

    Comparing all pairs is quadratic (70,000 images: 2.4e9 pairs). A bound makes it cheap and
    exact: if two thumbnails are within NEAR_LEVELS on average, the means of their 16 4x4 blocks
    are within 16 * NEAR_LEVELS of each other in L1 (each block's mean moves at most as much as
    its pixels do), so a k-d tree over block means finds every candidate pair, and only those are
    compared pixel by pixel. Exact copies are left to `exact_groups` (one per digest here).
    """
    first: dict[str, int] = {}
    reps = np.array([i for i, d in enumerate(digests) if first.setdefault(d, i) == i], dtype=np.int64)
    if len(reps) < 2:
        return []
    pixels = np.frombuffer(b"".join(thumbs[i] for i in reps), dtype=np.uint8).reshape(len(reps), 16, 16)
    blocks = pixels.reshape(len(reps), 4, 4, 4, 4).mean(axis=(2, 4)).reshape(len(reps), 16)
    pairs = cKDTree(blocks).query_pairs(16 * NEAR_LEVELS + 1e-6, p=1, output_type="ndarray")
    flat = pixels.reshape(len(reps), -1).astype(np.int16)
    close = pairs[np.abs(flat[pairs[:, 0]] - flat[pairs[:, 1]]).mean(1) <= NEAR_LEVELS] if len(pairs) else pairs
    parent = list(range(len(reps)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in close:
        parent[find(int(a))] = find(int(b))
    groups = defaultdict(list)
    for j in range(len(reps)):
        groups[find(j)].append(int(reps[j]))
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def drop_repeats(picks: dict[str, np.ndarray], digests: Sequence[str],
                 order: Sequence[str]) -> tuple[dict[str, np.ndarray], list[tuple[int, str, int, str]]]:
    """Keep each picked image once: the copy in the earliest split of ``order`` (then the first
    index) stays, every other copy goes. Returns the new picks and (dropped, its split, kept, its
    split) for each copy dropped: the same split means a duplicate, another split leakage."""
    where = {int(i): s for s in order for i in picks[s]}
    first: dict[str, int] = {}
    dropped = []
    for split in order:
        for i in picks[split]:
            kept = first.setdefault(digests[i], int(i))
            if kept != i:
                dropped.append((int(i), split, kept, where[kept]))
    gone = {d[0] for d in dropped}
    return {s: np.array([i for i in picks[s] if int(i) not in gone], dtype=picks[s].dtype) for s in order}, dropped
