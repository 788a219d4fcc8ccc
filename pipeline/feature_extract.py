"""Stage `feature_extract@<variant>`: frozen backbone features (cached), a head trained on them,
one MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

from _common import parse, run, train_outputs, variant

from cnnlab.models.backbones import WeightsUnavailableError
from cnnlab.stages.feature_extract import FeatureExtractConfig, feature_extract
from cnnlab.tracking.store_errors import store_error
from cnnlab.variants import run_params


def main() -> None:
    args, params = parse(__doc__, "variant", "split", "augmented", "features", "model", "metrics", "history",
                         "curves", "checkpoint")
    v = variant(params, args.variant, "feature_extract")
    p = v.settings
    result = feature_extract(
        variant=v.name,
        split_dir=Path(args.split),
        augmented_dir=Path(args.augmented) if p.train_data == "data/augmented" else None,
        cache_dir=Path(args.features),
        fx=FeatureExtractConfig(backbone=p.backbone, weights=p.weights, image_size=p.image_size,
                                extract_batch_size=p.batch_size, precision=p.precision,
                                channels_last=p.channels_last, head_dropout=p.head_dropout,
                                head_hidden=p.head_hidden, device=p.device, tf32=p.tf32),
        head_cfg=p.head_train_params(),
        seed=params.base.seed,
        experiment=params.base.experiment,
        logged_params=run_params(v, params.resolved_variants(), params.base.seed),
        out=train_outputs(args),
    )
    print(json.dumps({k: result[k] for k in ("val_accuracy", "best_epoch", "epochs_run",
                                             "extract_images_per_second", "assembly_max_logit_diff",
                                             "run_id")}, indent=2))


if __name__ == "__main__":
    run(main, WeightsUnavailableError, FileNotFoundError, ValueError, explain=store_error)
