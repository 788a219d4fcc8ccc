"""Stage `evaluate`: every declared variant on the held-out test split (an ensemble from its members'), McNemar tests, MLflow."""

from __future__ import annotations

from pathlib import Path

from _common import parse, run

from cnnlab.stages.evaluate import EvaluatePaths, evaluate_variants
from cnnlab.tracking.store_errors import store_error


def main() -> None:
    args, params = parse(__doc__, "split", "models", "features", "out", "metrics", "plots", "ensembles")
    paths = EvaluatePaths(split_dir=Path(args.split), models_dir=Path(args.models), features_dir=Path(args.features),
                          out_dir=Path(args.out), plots_dir=Path(args.plots), metrics_file=Path(args.metrics),
                          ensembles_file=Path(args.ensembles))
    variants = params.resolved_variants()
    # variant -> the DVC stage that produces data/models/<name>, for error messages
    stages = {name: v.stage for name, v in variants.items() if v.kind != "ensemble"}
    report = evaluate_variants(stages, params.evaluate, paths, seed=params.base.seed, experiment=params.base.experiment,
                               ensembles={name: v.settings for name, v in variants.items() if v.kind == "ensemble"})
    print(report, end="")


if __name__ == "__main__":
    run(main, FileNotFoundError, ValueError, explain=store_error)
