"""feature_extract on tiny real data with the real offline EfficientNet-Lite0 weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from cnnlab.data.shards import iter_images
from helpers.served import publish_variant
from helpers.variant_runs import FX, extract_features

def _reused(caplog: pytest.LogCaptureFixture) -> int:
    """How many "reusing cached" lines the stage logged since ``caplog.clear()``."""
    return sum("reusing cached" in r.getMessage() for r in caplog.records)


def test_features_once_head_trained_model_serves_raw_images(split_dir: Path, tmp_path: Path):
    result, out = extract_features(split_dir, tmp_path / "a")
    feats = torch.load(tmp_path / "a/features/train.pt", weights_only=True)
    assert feats["features"].shape == (60, 1280) and feats["labels"].shape == (60,)
    assert result.timing["extract_images_per_second"] > 0
    # the head trained on cached features and the re-assembled image model agree
    assert 0 <= result.timing["assembly_max_logit_diff"] < 1e-3
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["variant"] == "feature_extract"
    assert json.loads(out.metrics.read_text())["epochs_run"] == 5
    model = mlflow.pyfunc.load_model(publish_variant(result.run_id, out.model_dir, split_dir))
    images = list(iter_images(split_dir, "val", limit=4))  # the stored images' bytes, as an upload's
    assert len(images) == 4
    pred = model.predict(pd.DataFrame({"image": images}))
    assert len(pred) == 4 and pred["probabilities"].map(lambda p: abs(sum(p.values()) - 1) < 1e-6).all()


def test_cached_features_are_reused_until_the_backbone_input_changes(split_dir: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="cnnlab")
    extract_features(split_dir, tmp_path / "a")
    first = (tmp_path / "a/features/val.pt").read_bytes()
    assert _reused(caplog) == 0
    again, _ = extract_features(split_dir, tmp_path / "a")
    assert again.timing["extract_images_per_second"] == 0
    assert _reused(caplog) == 4  # train, val, calibration, test
    assert (tmp_path / "a/features/val.pt").read_bytes() == first
    bigger, _ = extract_features(split_dir, tmp_path / "a", FX.model_copy(update={"image_size": 40}))
    assert bigger.timing["extract_images_per_second"] > 0  # a new size means new features
    meta = json.loads((tmp_path / "a/features/meta.json").read_text())
    assert meta["train"]["precision"] == "bf16"
    assert meta["val"]["precision"] == meta["calibration"]["precision"] == meta["test"]["precision"] == "fp32"


def test_a_damaged_cache_file_is_recomputed_not_trusted(split_dir: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="cnnlab")
    extract_features(split_dir, tmp_path / "a")
    test_file = tmp_path / "a/features/test.pt"
    good = test_file.read_bytes()
    test_file.write_bytes(good[: len(good) // 2])  # truncated, as by a full disk or a killed copy
    caplog.clear()
    extract_features(split_dir, tmp_path / "a")
    assert any(r.levelno == logging.WARNING and "test.pt does not match the sha256" in r.getMessage()
               for r in caplog.records)
    assert _reused(caplog) == 3  # train, val and calibration reused, test recomputed
    assert torch.load(test_file, weights_only=True)["features"].shape[0] == 20


def test_with_augmented_copies_the_head_trains_on_their_cached_features_too(split_dir: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            caplog: pytest.LogCaptureFixture):
    """train_data: augmented: the copies' features are computed once, cached beside the
    split's, and each epoch the head sees one version of every training image (so some copies)."""
    import cnnlab.stages.variant as stage  # run_variant calls fit for every kind
    from cnnlab.config import AugmentParams
    from cnnlab.data.augment import run_augment

    caplog.set_level(logging.INFO, logger="cnnlab")
    aug = tmp_path / "aug"
    run_augment(split_dir, aug, tmp_path / "preview.png", AugmentParams(copies=2, preview_images=2), seed=0,
                size=FX.image_size)
    seen = {}
    real_fit = stage.fit

    def spy(model, train, val, cfg, **kw):
        seen["train"] = train
        return real_fit(model, train, val, cfg, **kw)

    monkeypatch.setattr(stage, "fit", spy)
    result, _ = extract_features(split_dir, tmp_path / "a", augmented=aug)
    meta = json.loads((tmp_path / "a/features/meta.json").read_text())
    assert meta["augmented"]["count"] == 120 and meta["augmented"]["precision"] == "bf16"
    train = seen["train"]
    assert train.images.shape == (180, 1280) and train.versions.shape == (60, 3)
    copies = torch.load(tmp_path / "a/features/augmented.pt", weights_only=True)["features"]
    assert torch.equal(train.images[60:], copies) and not torch.equal(train.images[:60], copies[::2])
    caplog.clear()
    extract_features(split_dir, tmp_path / "a", augmented=aug)  # everything reused, copies included
    assert _reused(caplog) == 5  # the split's four and the copies
    # new pixels under the same keys (another policy): the copies' features are recomputed
    run_augment(split_dir, aug, tmp_path / "preview.png", AugmentParams(rotation=90.0, copies=2, preview_images=2),
                seed=0, size=FX.image_size)
    caplog.clear()
    again, _ = extract_features(split_dir, tmp_path / "a", augmented=aug)
    assert _reused(caplog) == 4 and again.timing["extract_images_per_second"] > 0


def test_offline_without_weights_is_a_clear_error(split_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    from cnnlab.models.backbones import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError, match="resnet18"):
        extract_features(split_dir, tmp_path / "b", FX.model_copy(update={"backbone": "resnet18"}))
    # refused before any MLflow run was opened: nothing half-done in the store
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_experiment_by_name("t") is None
