"""The download stage's sources, against real files and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import socket
import zipfile
from pathlib import Path

import pytest

from cnnlab.data.archive import UnsafeArchiveError
from cnnlab.data.fetch import ChecksumError
from cnnlab.data.idx import FASHION_MNIST_FILES
from cnnlab.config import DownloadParams
from cnnlab.data.sources import (SourceError, copy_local_folder, fashion_mnist_urls, fetch_fashion_mnist,
                                   fetch_url_archive)
from conftest import make_image_folder

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
LIMITS = dict(max_bytes=100 * 1024**2, timeout_s=5.0)
ARCHIVE_LIMITS = dict(max_bytes=10**7, max_extracted_bytes=10**7, max_members=1000, max_compression_ratio=200.0,
                      timeout_s=5.0)


@pytest.fixture(scope="module")
def debian_files() -> Path:
    if not (DEBIAN / "train-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST is not installed: run `make data-deps` (make test does it)")
    return DEBIAN


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_fashion_mnist_from_the_debian_package(debian_files: Path, tmp_path: Path):
    info = fetch_fashion_mnist(tmp_path / "raw", local_dir=debian_files, mirrors=[_closed_port_url()], **LIMITS)
    assert sorted(p.name for p in (tmp_path / "raw" / "idx").iterdir()) == sorted(FASHION_MNIST_FILES)
    assert json.loads((tmp_path / "raw" / "source.json").read_text()) == info
    assert info["payload_md5"] == FASHION_MNIST_FILES


def test_fashion_mnist_over_http_when_not_installed(debian_files: Path, static_server, tmp_path: Path):
    served, url = static_server
    for name in FASHION_MNIST_FILES:
        shutil.copy(debian_files / name, served / name)
    info = fetch_fashion_mnist(tmp_path / "raw", local_dir=tmp_path / "nowhere", mirrors=[url], **LIMITS)
    assert info["origins"]["t10k-labels-idx1-ubyte.gz"] == f"{url}/t10k-labels-idx1-ubyte.gz"


def test_fashion_mnist_default_mirrors_are_the_published_locations():
    # S3 *website* endpoints speak plain HTTP only: an https:// URL to one never connects.
    mirrors = DownloadParams().fashion_mnist_url
    github = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion"
    s3 = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"
    assert {name: fashion_mnist_urls(mirrors, name) for name in FASHION_MNIST_FILES} == {
        "train-images-idx3-ubyte.gz": [f"{github}/train-images-idx3-ubyte.gz", f"{s3}/train-images-idx3-ubyte.gz"],
        "train-labels-idx1-ubyte.gz": [f"{github}/train-labels-idx1-ubyte.gz", f"{s3}/train-labels-idx1-ubyte.gz"],
        "t10k-images-idx3-ubyte.gz": [f"{github}/t10k-images-idx3-ubyte.gz", f"{s3}/t10k-images-idx3-ubyte.gz"],
        "t10k-labels-idx1-ubyte.gz": [f"{github}/t10k-labels-idx1-ubyte.gz", f"{s3}/t10k-labels-idx1-ubyte.gz"],
    }
    assert fashion_mnist_urls([f"{s3}/"], "x.gz") == [f"{s3}/x.gz"]


def _serve_fashion_mnist(debian_files: Path, folder: Path) -> None:
    folder.mkdir(parents=True)
    for name in FASHION_MNIST_FILES:
        (folder / name).symlink_to(debian_files / name)  # the server follows links; no 30 MB copy


@pytest.mark.parametrize("first", ["unreachable", "missing", "damaged"])
def test_fashion_mnist_falls_through_to_the_next_mirror(debian_files: Path, static_server, tmp_path: Path,
                                                        first: str):
    served, url = static_server
    _serve_fashion_mnist(debian_files, served / "good")
    (served / "bad").mkdir()
    if first == "damaged":  # served fine, but not the published file: must not be accepted
        for name in FASHION_MNIST_FILES:
            with gzip.open(served / "bad" / name, "wb") as fh:
                fh.write(b"\x00\x00\x08\x01" + b"\x00" * 8)
    bad = _closed_port_url() if first == "unreachable" else f"{url}/bad"
    info = fetch_fashion_mnist(tmp_path / "raw", local_dir=tmp_path / "nowhere", mirrors=[bad, f"{url}/good"],
                               **LIMITS)
    assert info["origins"] == {name: f"{url}/good/{name}" for name in FASHION_MNIST_FILES}
    assert sorted(p.name for p in (tmp_path / "raw" / "idx").iterdir()) == sorted(FASHION_MNIST_FILES)


def test_fashion_mnist_every_mirror_failing_names_every_url(static_server, tmp_path: Path):
    served, url = static_server
    (served / "empty").mkdir()
    closed = _closed_port_url()
    with pytest.raises(SourceError) as err:
        fetch_fashion_mnist(tmp_path / "raw", local_dir=tmp_path / "nowhere",
                            mirrors=[closed, f"{url}/empty"], **LIMITS)
    msg = str(err.value)
    assert f"could not download {closed}/train-images-idx3-ubyte.gz" in msg
    assert f"{url}/empty/train-images-idx3-ubyte.gz: the server answered HTTP 404" in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert not (tmp_path / "raw").exists()


def test_fashion_mnist_damaged_file_is_refused_and_old_output_kept(debian_files: Path, tmp_path: Path):
    local = tmp_path / "local"
    shutil.copytree(debian_files, local)
    with gzip.open(local / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(b"\x00\x00\x08\x01" + b"\x00" * 8)
    dest = tmp_path / "raw"
    dest.mkdir()
    (dest / "keep.txt").write_text("previous good output")
    with pytest.raises(ChecksumError, match="t10k-labels-idx1-ubyte.gz: decompressed-payload md5 mismatch"):
        fetch_fashion_mnist(dest, local_dir=local, mirrors=[_closed_port_url()], **LIMITS)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert (dest / "keep.txt").read_text() == "previous good output"


def test_fashion_mnist_offline_and_not_installed_says_what_to_do(tmp_path: Path):
    with pytest.raises(SourceError, match="apt-get install dataset-fashion-mnist"):
        fetch_fashion_mnist(tmp_path / "raw", local_dir=tmp_path / "nowhere", mirrors=[_closed_port_url()], **LIMITS)
    assert not (tmp_path / "raw").exists()


def _zip_tree(folder: Path, archive: Path, extra: dict[str, bytes] | None = None) -> str:
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, f"pets/{p.relative_to(folder)}")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return hashlib.sha256(archive.read_bytes()).hexdigest()


def test_url_archive_is_verified_and_extracted(static_server, tmp_path: Path):
    served, url = static_server
    digest = _zip_tree(make_image_folder(tmp_path / "tree", {"cat": 2, "dog": 2}), served / "pets.zip")
    info = fetch_url_archive(tmp_path / "raw", url=f"{url}/pets.zip", sha256=digest.upper(), **ARCHIVE_LIMITS)
    assert info["archive"] == "archive/pets.zip" and info["sha256"] == digest
    assert sorted(p.name for p in (tmp_path / "raw" / "images" / "pets" / "cat").iterdir()) == ["000.png", "001.png"]


def test_url_archive_wrong_checksum(static_server, tmp_path: Path):
    served, url = static_server
    _zip_tree(make_image_folder(tmp_path / "tree", {"cat": 1, "dog": 1}), served / "pets.zip")
    with pytest.raises(ChecksumError):
        fetch_url_archive(tmp_path / "raw", url=f"{url}/pets.zip", sha256="0" * 64, **ARCHIVE_LIMITS)
    assert not (tmp_path / "raw").exists()


def test_url_zip_slip_is_refused_even_with_the_right_checksum(static_server, tmp_path: Path):
    served, url = static_server
    digest = _zip_tree(make_image_folder(tmp_path / "tree", {"cat": 1, "dog": 1}), served / "evil.zip",
                       extra={"../../escaped.png": b"x"})
    dest = tmp_path / "out" / "raw"
    dest.mkdir(parents=True)
    (dest / "keep.txt").write_text("old")
    with pytest.raises(UnsafeArchiveError, match=r"\.\./\.\./escaped\.png"):
        fetch_url_archive(dest, url=f"{url}/evil.zip", sha256=digest, **ARCHIVE_LIMITS)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["raw"]
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert not list(tmp_path.rglob("escaped.png"))


def test_local_folder_is_snapshotted(tmp_path: Path):
    folder = make_image_folder(tmp_path / "mine", {"a": 2, "b": 1})
    (folder / ".DS_Store").write_bytes(b"junk")
    info = copy_local_folder(tmp_path / "raw", folder=folder)
    assert info["source"] == "local"
    assert sorted(p.relative_to(tmp_path / "raw" / "images").as_posix()
                  for p in (tmp_path / "raw" / "images").rglob("*.png")) == ["a/000.png", "a/001.png", "b/000.png"]
    assert not (tmp_path / "raw" / "images" / ".DS_Store").exists()


@pytest.mark.parametrize("setup", ["missing", "empty"])
def test_local_folder_errors_say_what_to_do(tmp_path: Path, setup: str):
    folder = tmp_path / "mine"
    if setup == "empty":
        folder.mkdir()
        (folder / "README.md").write_text("put images here")
    with pytest.raises(SourceError, match="<class>/<image>|one sub-folder of images per class"):
        copy_local_folder(tmp_path / "raw", folder=folder)
