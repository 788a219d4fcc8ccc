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
    info = download(Path(args.out), params.download)
    skipped = info.pop("skipped", {})
    print(json.dumps(info, indent=2))
    for kind, paths in skipped.items():  # all of them are in source.json and the split's report
        more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
        print(f"skipped ({kind.replace('_', ' ')}): {', '.join(paths[:3])}{more}")


if __name__ == "__main__":
    run(main, SourceError, DownloadError, UnsafeArchiveError, IdxFormatError)
