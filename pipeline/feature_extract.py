"""Stage `feature_extract`: frozen backbone features (cached), a head trained on them, one MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

from _common import parse, run, train_outputs

from cnnlab.models.backbones import WeightsUnavailableError
from cnnlab.transfer import FeatureExtractConfig, feature_extract


def main() -> None:
    args, params = parse(__doc__, "split", "features", "model", "metrics", "history", "curves", "checkpoint")
    p = params.feature_extract
    result = feature_extract(
        split_dir=Path(args.split),
        cache_dir=Path(args.features),
        fx=FeatureExtractConfig(backbone=p.backbone, weights=p.weights, image_size=p.image_size,
                                extract_batch_size=p.batch_size, precision=p.precision,
                                channels_last=p.channels_last, head_dropout=p.head_dropout,
                                head_hidden=p.head_hidden, device=p.device, tf32=p.tf32),
        head_cfg=p.head_train_params(),
        seed=params.base.seed,
        experiment=params.base.experiment,
        logged_params={"seed": params.base.seed, "variant": "feature_extract", **p.model_dump()},
        out=train_outputs(args),
    )
    print(json.dumps({k: result[k] for k in ("val_accuracy", "best_epoch", "epochs_run",
                                             "extract_images_per_second", "assembly_max_logit_diff",
                                             "run_id", "model_uri")}, indent=2))


if __name__ == "__main__":
    run(main, WeightsUnavailableError, FileNotFoundError, ValueError)
