"""Stage `augment`: materialize K seeded augmented copies of every training image."""

from __future__ import annotations

import json
from pathlib import Path

from _common import parse, run

from cnnlab.data.augment import build_policy
from cnnlab.stages.augment import augment, copies_size


def main() -> None:
    args, params = parse(__doc__, "split", "out", "preview", "metrics")
    size = copies_size(params.augment, params.scratch.image_size, Path(args.split))
    print(f"policy: {build_policy(params.augment)}\ncopies at {size} px (augment.image_size: "
          f"{params.augment.image_size})")
    summary = augment(Path(args.split), Path(args.out), Path(args.preview), Path(args.metrics), params.augment,
                      seed=params.base.seed, size=size)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    run(main, FileNotFoundError)
