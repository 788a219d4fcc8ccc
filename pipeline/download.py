"""Stage `download`: fetch the configured source into a self-contained raw folder."""

from __future__ import annotations

import json
from pathlib import Path

from _common import parse, run

from cnnlab.data.archive import UnsafeArchiveError
from cnnlab.data.fetch import DownloadError
from cnnlab.data.idx import IdxFormatError
from cnnlab.data.sources import SourceError, copy_local_folder, fetch_fashion_mnist, fetch_url_archive


def main() -> None:
    args, params = parse(__doc__, "out")
    p = params.download
    out = Path(args.out)
    if p.source == "fashion_mnist":
        info = fetch_fashion_mnist(out, local_dir=Path(p.fashion_mnist_dir), mirrors=p.fashion_mnist_url,
                                   max_bytes=p.max_download_bytes, timeout_s=p.timeout_s)
    elif p.source == "url":
        info = fetch_url_archive(out, url=p.url, sha256=p.sha256, max_bytes=p.max_download_bytes,
                                 max_extracted_bytes=p.max_extracted_bytes, max_members=p.max_members,
                                 max_compression_ratio=p.max_compression_ratio, timeout_s=p.timeout_s)
    else:
        info = copy_local_folder(out, folder=Path(p.local_dir))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    run(main, SourceError, DownloadError, UnsafeArchiveError, IdxFormatError)
