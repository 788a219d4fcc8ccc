"""Stage `evaluate`: every variant on the held-out test split, their ensemble, McNemar tests, MLflow."""

from __future__ import annotations

from pathlib import Path

from _common import parse, run

from cnnlab.evaluate import evaluate_variants


def main() -> None:
    args, params = parse(__doc__, "split", "models", "features", "val_metrics", "out", "metrics", "plots")
    p = params.evaluate
    report = evaluate_variants(
        variants=p.variants,
        # The DVC stage that produces data/models/<name>, for error messages.
        stages={name: f"train@{name}" if name in params.variants else name for name in p.variants},
        split_dir=Path(args.split),
        models_dir=Path(args.models),
        val_metrics_dir=Path(args.val_metrics),
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
    run(main, FileNotFoundError, ValueError)
