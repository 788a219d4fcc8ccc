"""Stage `download`: the configured source into a self-contained raw folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnlab.config import DownloadParams
from cnnlab.data.sources import (
    copy_local_folder,
    fetch_fashion_mnist,
    fetch_url_archive,
)


def download(out: Path, cfg: DownloadParams) -> dict[str, Any]:
    """Fetch ``cfg.source`` into ``out`` (checksums verified, archives extracted safely); returns
    what was fetched, from where, with which checksums (also in ``out/source.json``)."""
    if cfg.source == "fashion_mnist":
        return fetch_fashion_mnist(out, local_dir=Path(cfg.fashion_mnist_dir), mirrors=list(cfg.fashion_mnist_url),
                                   max_bytes=cfg.max_download_bytes, timeout_s=cfg.timeout_s)
    if cfg.source == "url":
        return fetch_url_archive(out, url=cfg.url, sha256=cfg.sha256, max_bytes=cfg.max_download_bytes,
                                 max_extracted_bytes=cfg.max_extracted_bytes, max_members=cfg.max_members,
                                 max_compression_ratio=cfg.max_compression_ratio, timeout_s=cfg.timeout_s)
    return copy_local_folder(out, folder=Path(cfg.local_dir), follow_outside=cfg.follow_outside_links)
