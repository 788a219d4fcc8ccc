"""The `download` stage's work: turn a configured source into a self-contained raw folder.

Layout of the raw folder (``data/raw`` by default)::

    source.json           what was fetched, from where, with which checksums
    idx/                  fashion_mnist: the four original *-ubyte.gz files
    archive/<name>        url: the downloaded archive, as fetched
    images/<class>/...    url, local: the ImageFolder tree

The folder is built in a temporary sibling and swapped in only when complete, so a failed
download never leaves a half-written tree where the next stage would read it.
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cnnlab.data.archive import safe_extract
from cnnlab.data.fetch import ChecksumError, DownloadError, download
from cnnlab.data.idx import FASHION_MNIST_FILES, IdxFormatError, payload_md5
from cnnlab.data.images import IMAGE_EXTENSIONS
from cnnlab.data.walk import walk_images
from cnnlab.utils.files import staged_dir, write_json
from cnnlab.utils.progress import progress


class SourceError(RuntimeError):
    """The configured data source cannot be used; the message says what to change."""


def _write_manifest(root: Path, info: dict[str, Any]) -> None:
    write_json(root / "source.json", info)


def fashion_mnist_urls(mirrors: Sequence[str], name: str) -> list[str]:
    """The URLs of file ``name`` under each mirror (a folder URL), in the order they are tried."""
    return [f"{mirror.rstrip('/')}/{name}" for mirror in mirrors]


def _first_intact(
    urls: Sequence[str], target: Path, md5: str, *, max_bytes: int, timeout_s: float
) -> tuple[str | None, list[str]]:
    """Download ``target`` from the first URL whose file has payload MD5 ``md5``.

    Returns that URL (None when every one failed) and why each URL before it failed. A mirror
    that fails or serves another file (a proxy's error page, a tampered copy) is skipped, which
    is what makes plain-HTTP mirrors acceptable: only the right bytes get through.
    """
    failures = []
    for url in urls:
        try:
            download(url, target, sha256=None, max_bytes=max_bytes, timeout_s=timeout_s)
            actual = payload_md5(target)
        except DownloadError as exc:  # its message names the URL
            failures.append(str(exc))
            continue
        except IdxFormatError as exc:
            failures.append(f"{url}: not the expected gzip file ({exc})")
            continue
        if actual == md5:
            return url, failures
        failures.append(str(ChecksumError(url, md5, actual, algorithm="decompressed-payload md5")))
    target.unlink(missing_ok=True)
    return None, failures


def fetch_fashion_mnist(
    dest: Path, *, local_dir: Path, mirrors: Sequence[str], max_bytes: int, timeout_s: float
) -> dict[str, Any]:
    """Copy the four IDX files from ``local_dir``, or download each missing one from the first
    of ``mirrors`` (folder URLs) that serves it intact, and verify them."""
    if not mirrors:
        raise SourceError("download.fashion_mnist_url is empty; give at least one URL of a folder holding the files")
    with staged_dir(dest) as tmp:
        idx = tmp / "idx"
        idx.mkdir()
        origins = {}
        for name, md5 in FASHION_MNIST_FILES.items():
            target = idx / name
            if (local_dir / name).is_file():
                shutil.copyfile(local_dir / name, target)
                origins[name] = str(local_dir / name)
                actual = payload_md5(target)
                if actual != md5:
                    raise ChecksumError(origins[name], md5, actual, algorithm="decompressed-payload md5")
            else:
                url, failures = _first_intact(fashion_mnist_urls(mirrors, name), target, md5,
                                              max_bytes=max_bytes, timeout_s=timeout_s)
                if url is None:
                    tried = "\n".join(f"  - {f}" for f in failures)
                    raise SourceError(
                        f"Fashion-MNIST file {name} is not in {local_dir} and no URL of "
                        f"download.fashion_mnist_url gave it:\n{tried}\n"
                        "Offline? Install Debian's package (`apt-get install dataset-fashion-mnist`, "
                        "or `make data-deps`) or set download.fashion_mnist_dir to a folder holding the files."
                    )
                origins[name] = url
        info = {"source": "fashion_mnist", "format": "idx", "payload_md5": dict(FASHION_MNIST_FILES),
                "origins": origins}
        _write_manifest(tmp, info)
    return info


def fetch_url_archive(
    dest: Path,
    *,
    url: str,
    sha256: str,
    max_bytes: int,
    max_extracted_bytes: int,
    max_members: int,
    max_compression_ratio: float,
    timeout_s: float,
) -> dict[str, Any]:
    """Download an archive of an ImageFolder tree, verify its sha256 and extract it safely."""
    name = Path(urllib.parse.urlparse(url).path).name or "archive"
    with staged_dir(dest) as tmp:
        archive = tmp / "archive" / name
        download(url, archive, sha256=sha256, max_bytes=max_bytes, timeout_s=timeout_s)
        safe_extract(
            archive,
            tmp / "images",
            max_members=max_members,
            max_total_bytes=max_extracted_bytes,
            max_compression_ratio=max_compression_ratio,
        )
        info = {"source": "url", "format": "image_folder", "url": url, "sha256": sha256.lower(),
                "archive": f"archive/{name}", "skipped": drop_stray_files(tmp / "images")}
        _write_manifest(tmp, info)
    return info


def copy_local_folder(dest: Path, *, folder: Path, follow_outside: bool = False) -> dict[str, Any]:
    """Snapshot the image files of a local ImageFolder tree, so later stages never read outside the
    pipeline. The walk is `cnnlab.data.walk.walk_images`: loops are not followed, links out of the
    folder only with ``follow_outside``, and stray files are listed in ``source.json``, not copied."""
    if not folder.is_dir():
        raise SourceError(
            f"download.local_dir = {str(folder)!r} is not a folder; point it at a folder laid out as "
            "<class>/<image> (or train/<class>/<image> + test/<class>/<image>)"
        )
    walk = walk_images(folder, IMAGE_EXTENSIONS, follow_outside=follow_outside)
    if not walk.files:
        raise SourceError(
            f"download.local_dir = {str(folder)!r} holds no image file ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "put one sub-folder of images per class in it"
        )
    with staged_dir(dest) as tmp:
        for path in progress(walk.files, desc="copy images"):
            target = tmp / "images" / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(path, target)  # the bytes: a link inside the folder becomes a plain file
            except OSError as e:
                raise SourceError(f"{path}: cannot be read ({e.strerror}); fix its permissions or move it "
                                  f"out of {folder}") from None
        info = {"source": "local", "format": "image_folder", "path": str(folder), "skipped": walk.skipped()}
        _write_manifest(tmp, info)
    return info


def drop_stray_files(images: Path) -> dict[str, list[str]]:
    """Delete what is not a candidate image from an extracted tree; returns what was skipped, by kind
    (extracted archives hold no links: `safe_extract` never materializes them)."""
    walk = walk_images(images, IMAGE_EXTENSIONS)
    for rel in walk.stray:
        (images / rel).unlink()
    return walk.skipped()


def read_source_info(raw_dir: Path) -> dict[str, Any]:
    """The ``source.json`` that the download stage wrote."""
    path = raw_dir / "source.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path} not found: run the download stage first (`dvc repro download`)") from None

