"""Stage `feature_extract@<variant>`: frozen backbone features (cached), a head trained on them,
one MLflow run."""

from __future__ import annotations

from pathlib import Path

from _common import parse, print_result, run, variant_run

from cnnlab.models.backbones import WeightsUnavailableError
from cnnlab.stages.feature_extract import feature_extract
from cnnlab.tracking.store_errors import store_error


def main() -> None:
    args, params = parse(__doc__, "variant", "split", "augmented", "features", "model", "metrics", "history",
                         "curves", "checkpoint")
    v, settings = variant_run(args, params, "feature_extract")
    print_result(feature_extract(v, settings, split_dir=Path(args.split), augmented_dir=Path(args.augmented),
                                 cache_dir=Path(args.features)))


if __name__ == "__main__":
    run(main, WeightsUnavailableError, FileNotFoundError, ValueError, explain=store_error)
