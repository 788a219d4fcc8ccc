"""Stage `download`: fetch the configured source into a self-contained raw folder."""

from __future__ import annotations

import json
from pathlib import Path

from _common import parse, run

from cnnlab.data.archive import UnsafeArchiveError
from cnnlab.data.fetch import DownloadError
from cnnlab.data.idx import IdxFormatError
from cnnlab.data.sources import SourceError
from cnnlab.stages.download import download


def main() -> None:
    args, params = parse(__doc__, "out")
    p = params.download
    info = download(Path(args.out), source=p.source, fashion_mnist_dir=Path(p.fashion_mnist_dir),
                    fashion_mnist_urls=p.fashion_mnist_url, url=p.url, sha256=p.sha256,
                    local_dir=Path(p.local_dir), max_download_bytes=p.max_download_bytes,
                    max_extracted_bytes=p.max_extracted_bytes, max_members=p.max_members,
                    max_compression_ratio=p.max_compression_ratio, timeout_s=p.timeout_s)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    run(main, SourceError, DownloadError, UnsafeArchiveError, IdxFormatError)
