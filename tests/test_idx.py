import gzip
from pathlib import Path

import numpy as np
import pytest

from cnnlab.data.idx import IdxFormatError, load_fashion_mnist, payload_md5, read_idx
from conftest import write_idx


def test_round_trip(tmp_path: Path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)


def test_length_mismatch_is_refused(tmp_path: Path):
    write_idx(tmp_path / "a.gz", np.zeros((2, 2), np.uint8))
    data = gzip.open(tmp_path / "a.gz").read()
    with gzip.open(tmp_path / "b.gz", "wb") as fh:
        fh.write(data[:-1])
    with pytest.raises(IdxFormatError, match="declares shape"):
        read_idx(tmp_path / "b.gz")


def test_not_idx_and_not_gzip(tmp_path: Path):
    with gzip.open(tmp_path / "a.gz", "wb") as fh:
        fh.write(b"PK\x03\x04 something else")
    with pytest.raises(IdxFormatError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "a.gz")
    (tmp_path / "c.gz").write_bytes(b"plain text")
    with pytest.raises(IdxFormatError):
        payload_md5(tmp_path / "c.gz")


def test_images_and_labels_must_agree(tiny_idx: Path):
    write_idx(tiny_idx / "idx" / "t10k-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(IdxFormatError, match="do not match"):
        load_fashion_mnist(tiny_idx / "idx")


def test_label_out_of_range(tiny_idx: Path):
    write_idx(tiny_idx / "idx" / "t10k-labels-idx1-ubyte.gz", np.full(60, 10, np.uint8))
    with pytest.raises(IdxFormatError, match="class id"):
        load_fashion_mnist(tiny_idx / "idx")
