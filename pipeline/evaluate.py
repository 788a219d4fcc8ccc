"""Stage `evaluate`: every declared variant on the held-out test split, their ensemble, McNemar tests, MLflow."""

from __future__ import annotations

from pathlib import Path

from _common import parse, run

from cnnlab.stages.evaluate import evaluate_variants
from cnnlab.tracking.store_errors import store_error


def main() -> None:
    args, params = parse(__doc__, "split", "models", "features", "out", "metrics", "plots")
    p = params.evaluate
    variants = params.resolved_variants()
    report = evaluate_variants(
        variants=list(variants),
        # The DVC stage that produces data/models/<name>, for error messages.
        stages={name: v.stage for name, v in variants.items()},
        split_dir=Path(args.split),
        models_dir=Path(args.models),
        out_dir=Path(args.out),
        plots_dir=Path(args.plots),
        metrics_file=Path(args.metrics),
        batch_size=p.batch_size,
        bootstrap_samples=p.bootstrap_samples,
        confidence=p.confidence,
        ensemble=p.ensemble,
        misclassified=p.misclassified,
        seed=params.base.seed,
        experiment=params.base.experiment,
        logged_params={"seed": params.base.seed, "evaluate": p.model_dump()},
        features_dir=Path(args.features),
        device=p.device,
    )
    print(report, end="")


if __name__ == "__main__":
    run(main, FileNotFoundError, ValueError, explain=store_error)
