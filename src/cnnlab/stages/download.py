"""Stage `download`: the configured source into a self-contained raw folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from cnnlab.data.sources import copy_local_folder, fetch_fashion_mnist, fetch_url_archive


def download(
    out: Path,
    *,
    source: Literal["fashion_mnist", "url", "local"],
    fashion_mnist_dir: Path,
    fashion_mnist_urls: Sequence[str],
    url: str | None,
    sha256: str | None,
    local_dir: Path,
    max_download_bytes: int,
    max_extracted_bytes: int,
    max_members: int,
    max_compression_ratio: float,
    timeout_s: float,
) -> dict[str, Any]:
    """Fetch ``source`` into ``out`` (checksums verified, archives extracted safely); returns what
    was fetched, from where, with which checksums (also in ``out/source.json``)."""
    if source == "fashion_mnist":
        return fetch_fashion_mnist(out, local_dir=fashion_mnist_dir, mirrors=list(fashion_mnist_urls),
                                   max_bytes=max_download_bytes, timeout_s=timeout_s)
    if source == "url":
        return fetch_url_archive(out, url=url, sha256=sha256, max_bytes=max_download_bytes,
                                 max_extracted_bytes=max_extracted_bytes, max_members=max_members,
                                 max_compression_ratio=max_compression_ratio, timeout_s=timeout_s)
    return copy_local_folder(out, folder=local_dir)
