"""Images stored as a few Parquet shards per split, in the layout of Hugging Face image datasets.

A folder (``data/split``, ``data/augmented``) holds, for each of its splits::

    <split>-00000-of-00002.parquet   rows: image {bytes, path}, label, class, source
    <split>.csv                      the manifest: key, label, class, source, shard, row, format, stored
    shards.json                      per split and shard: rows, bytes, sha256

Why Parquet, rather than a file per image or tar shards:

- a few files whatever the number of images: DVC hashes, links, pushes and checks files one by
  one, and slows down with many small ones (dvc issues #7607, #1970);
- no 512-byte header and padding per member, as tar has (a Fashion-MNIST PNG is ~350 bytes);
- row groups give random access, so the decode cache (`cnnlab.data.decoded`) reads a split in
  parallel and a reader needs only the rows it wants;
- other tools read it as it is: pandas, pyarrow, DuckDB, and `datasets.load_dataset("parquet",
  data_files=...)`, which sees Hugging Face's `Image` and `ClassLabel` features in the schema.

The ``image.bytes`` are a whole encoded file: the user's own JPEG/PNG/WebP bytes when nothing had
to change (``stored: original``), else the upright, converted, downscaled image re-encoded, as a
JPEG when it came from one and a lossless PNG otherwise (``stored`` says which and why). The manifest's rows are in shard order, so row ``i`` of ``<split>.csv`` is
image ``i`` of the split everywhere (labels, decoded arrays, features).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cnnlab.utils.files import file_digest, write_csv, write_json

MANIFEST_FIELDS = ("key", "label", "class", "source", "shard", "row", "format", "stored")
INDEX = "shards.json"
# A shard is closed past this size: few files, each still small enough to push, pull and hash in
# one go. A row group (what one decode worker reads at a time) past GROUP_BYTES or GROUP_ROWS.
SHARD_BYTES = 256 << 20
GROUP_BYTES = 8 << 20
GROUP_ROWS = 1024

_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_SCHEMA = pa.schema([("image", _IMAGE), ("label", pa.int64()), ("class", pa.string()), ("source", pa.string())])


def _schema(classes: Sequence[str]) -> pa.Schema:
    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": list(classes)},
                "class": {"dtype": "string", "_type": "Value"}, "source": {"dtype": "string", "_type": "Value"}}
    return _SCHEMA.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})


class ShardWriter:
    """Writes one split's images into Parquet shards, then its manifest and its part of
    ``shards.json`` (`close`). Writers of one folder must run one after another."""

    def __init__(self, folder: Path, split: str, classes: Sequence[str]) -> None:
        self.folder, self.split, self.schema = folder, split, _schema(classes)
        self.rows: list[dict] = []
        self._group: list[tuple[bytes, str, int, str, str]] = []
        self._group_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._shards: list[Path] = []
        self._shard_bytes = 0
        self._shard_rows = 0

    def add(self, data: bytes, *, key: str, label: int, cls: str, source: str, fmt: str, stored: str) -> None:
        """One image: ``data`` is a whole encoded file; ``key`` names it within the split
        (``<class>/<name>``); ``fmt`` its format (``jpeg``, ``png``, ...); ``stored`` why these bytes."""
        if self._writer is None or self._shard_bytes >= SHARD_BYTES:
            self._next_shard()
        self.rows.append({"key": key, "label": label, "class": cls, "source": source,
                          "shard": len(self._shards) - 1, "row": self._shard_rows, "format": fmt, "stored": stored})
        self._group.append((data, f"{key}.{fmt}", label, cls, source))
        self._group_bytes += len(data)
        self._shard_bytes += len(data)
        self._shard_rows += 1
        if self._group_bytes >= GROUP_BYTES or len(self._group) >= GROUP_ROWS:
            self._flush()

    def _next_shard(self) -> None:
        self._close_shard()
        path = self.folder / f".{self.split}-{len(self._shards):05d}.parquet"
        self._shards.append(path)
        # Image bytes are compressed already; zstd still takes the PNG headers every small image
        # repeats (Fashion-MNIST's shards: 30% smaller) and costs little.
        self._writer = pq.ParquetWriter(path, self.schema, compression="zstd", compression_level=1)
        self._shard_bytes = self._shard_rows = 0

    def _flush(self) -> None:
        if not self._group:
            return
        data, paths, labels, classes, sources = zip(*self._group, strict=True)
        images = pa.StructArray.from_arrays([pa.array(data, pa.binary()), pa.array(paths, pa.string())],
                                            fields=list(_IMAGE))
        table = pa.Table.from_arrays([images, pa.array(labels, pa.int64()), pa.array(classes, pa.string()),
                                      pa.array(sources, pa.string())], schema=self.schema)
        assert self._writer is not None
        self._writer.write_table(table, row_group_size=len(self._group))
        self._group, self._group_bytes = [], 0

    def _close_shard(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> list[dict]:
        """Finish the shards (named ``<split>-<i>-of-<n>.parquet``), write the manifest and the
        index entry; returns the manifest rows. A split with no images gets one empty shard, so
        every reader finds the split's schema."""
        if not self._shards:
            self._next_shard()
        self._close_shard()
        n, entries = len(self._shards), []
        for i, path in enumerate(self._shards):
            final = self.folder / f"{self.split}-{i:05d}-of-{n:05d}.parquet"
            path.rename(final)
            entries.append({"file": final.name, "rows": sum(r["shard"] == i for r in self.rows),
                            "bytes": final.stat().st_size, "sha256": file_digest(final)})
        for row in self.rows:
            row["shard"] = entries[row["shard"]]["file"]
        write_csv(self.folder / f"{self.split}.csv", MANIFEST_FIELDS, self.rows)
        index = _index(self.folder) if (self.folder / INDEX).exists() else {}
        write_json(self.folder / INDEX, {**index, self.split: entries})
        return self.rows


def _index(folder: Path) -> dict:
    path = folder / INDEX
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: {folder} was written by an older cnnlab or another stage is "
                                "out of date; run `dvc repro`") from None


def read_manifest(folder: Path, split: str) -> list[dict]:
    """Rows of ``<split>.csv`` with ``label`` and ``row`` as int, in the split's image order."""
    with open(folder / f"{split}.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["label"], row["row"] = int(row["label"]), int(row["row"])
    return rows


def content_digest(folder: Path, split: str) -> str:
    """Identifies a split's images and labels: its manifest and its shards' sha256 (recorded when
    they were written; DVC checks the files themselves against its own hashes)."""
    h = hashlib.sha256((folder / f"{split}.csv").read_bytes())
    h.update(json.dumps(_index(folder)[split], sort_keys=True).encode())
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class Group:
    """One row group: images ``start`` to ``start + rows - 1`` of the split."""

    path: Path
    index: int
    start: int
    rows: int

    def read(self) -> list[bytes]:
        table = pq.ParquetFile(self.path).read_row_group(self.index, columns=["image"])
        return table.column("image").combine_chunks().field("bytes").to_pylist()


def groups(folder: Path, split: str) -> list[Group]:
    """The split's row groups in image order."""
    out, start = [], 0
    for entry in _index(folder)[split]:
        path = folder / entry["file"]
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            out.append(Group(path, g, start, rows))
            start += rows
    return out


def iter_images(folder: Path, split: str, limit: int | None = None) -> Iterator[bytes]:
    """The split's encoded images in manifest order (the first ``limit`` only, when given)."""
    seen = 0
    for group in groups(folder, split):
        for data in group.read():
            if limit is not None and seen >= limit:
                return
            seen += 1
            yield data
