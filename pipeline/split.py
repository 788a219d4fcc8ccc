"""Stage `split`: verify every image, quarantine the bad ones, split train/val/test by class."""

from __future__ import annotations

from pathlib import Path

from _common import parse, run

from cnnlab.data.folders import LayoutError
from cnnlab.data.idx import IdxFormatError
from cnnlab.data.sources import SourceError
from cnnlab.data.split import SplitError
from cnnlab.stages.split import split


def main() -> None:
    args, params = parse(__doc__, "raw", "out", "metrics")
    split(Path(args.raw), Path(args.out), Path(args.metrics), params.split, seed=params.base.seed)
    print((Path(args.out) / "report.md").read_text(encoding="utf-8"))
    print(f"(also {Path(args.out) / 'report.json'}; the numbers in {args.metrics})")


if __name__ == "__main__":
    run(main, SourceError, LayoutError, SplitError, IdxFormatError)
