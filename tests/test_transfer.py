"""feature_extract on tiny real data with the real offline EfficientNet-Lite0 weights."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from cnnlab.config import HeadParams, TrainParams
from cnnlab.data.split import read_manifest, run_split
from cnnlab.training.outputs import TrainOutputs
from cnnlab.stages.feature_extract import FeatureExtractConfig, feature_extract
from helpers.served import publish_variant

HEAD = TrainParams(**HeadParams(epochs=5, early_stopping_patience=None).model_dump(), precision="fp32",
                   channels_last=False)
FX = FeatureExtractConfig(backbone="efficientnet_lite0", weights="default", image_size=32, extract_batch_size=32,
                          precision="bf16", channels_last=True, head_dropout=0.5, head_hidden=None)


@pytest.fixture
def split_dir(tiny_idx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("CNNLAB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "split"
    run_split(tiny_idx, out, seed=0, val_fraction=0.2, test_fraction=0.2, max_train_per_class=6,
              max_val_per_class=3, max_test_per_class=2, max_image_pixels=10_000, max_side=None, color_mode="auto")
    return out


def _run(split_dir: Path, root: Path, fx: FeatureExtractConfig = FX, augmented: Path | None = None):
    out = TrainOutputs(model_dir=root / "model", metrics=root / "metrics.json", history=root / "history.csv",
                       curves=root / "curves.png", checkpoint=root / "ckpt.pt")
    return feature_extract(variant="feature_extract", split_dir=split_dir, augmented_dir=augmented,
                           cache_dir=root / "features", fx=fx, head_cfg=HEAD, seed=0, experiment="t",
                           logged_params={"variant": "feature_extract"}, out=out), out


def test_features_once_head_trained_model_serves_raw_images(split_dir: Path, tmp_path: Path):
    result, out = _run(split_dir, tmp_path / "a")
    feats = torch.load(tmp_path / "a/features/train.pt", weights_only=True)
    assert feats["features"].shape == (60, 1280) and feats["labels"].shape == (60,)
    assert result["extract_images_per_second"] > 0
    # the head trained on cached features and the re-assembled image model agree
    assert 0 <= result["assembly_max_logit_diff"] < 1e-3
    run = mlflow.MlflowClient().get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["variant"] == "feature_extract"
    assert json.loads(out.metrics.read_text())["epochs_run"] == 5
    model = mlflow.pyfunc.load_model(publish_variant(result["run_id"], out.model_dir, split_dir))
    rows = read_manifest(split_dir, "val")[:4]
    pred = model.predict(pd.DataFrame({"image": [Path(r["path"]).read_bytes() for r in rows]}))
    assert len(pred) == 4 and pred["probabilities"].map(lambda p: abs(sum(p.values()) - 1) < 1e-6).all()


def test_cached_features_are_reused_until_the_backbone_input_changes(split_dir: Path, tmp_path: Path, capsys):
    _run(split_dir, tmp_path / "a")
    first = (tmp_path / "a/features/val.pt").read_bytes()
    again, _ = _run(split_dir, tmp_path / "a")
    assert again["extract_images_per_second"] == 0
    assert capsys.readouterr().out.count("reusing cached") == 3
    assert (tmp_path / "a/features/val.pt").read_bytes() == first
    bigger, _ = _run(split_dir, tmp_path / "a", FeatureExtractConfig(**{**FX.__dict__, "image_size": 40}))
    assert bigger["extract_images_per_second"] > 0  # a new size means new features
    meta = json.loads((tmp_path / "a/features/meta.json").read_text())
    assert meta["train"]["precision"] == "bf16" and meta["val"]["precision"] == meta["test"]["precision"] == "fp32"


def test_a_damaged_cache_file_is_recomputed_not_trusted(split_dir: Path, tmp_path: Path, capsys):
    _run(split_dir, tmp_path / "a")
    test_file = tmp_path / "a/features/test.pt"
    good = test_file.read_bytes()
    test_file.write_bytes(good[: len(good) // 2])  # truncated, as by a full disk or a killed copy
    capsys.readouterr()
    _run(split_dir, tmp_path / "a")
    captured = capsys.readouterr()
    assert "test.pt does not match the sha256" in captured.err
    assert captured.out.count("reusing cached") == 2  # train and val reused, test recomputed
    assert torch.load(test_file, weights_only=True)["features"].shape[0] == 20


def test_with_augmented_copies_the_head_trains_on_their_cached_features_too(split_dir: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch, capsys):
    """train_data: data/augmented: the copies' features are computed once, cached beside the
    split's, and each epoch the head sees one version of every training image (so some copies)."""
    import cnnlab.stages.feature_extract as stage
    from cnnlab.config import AugmentParams
    from cnnlab.data.augment import run_augment

    aug = tmp_path / "aug"
    run_augment(split_dir, aug, tmp_path / "preview.png", policy_params=AugmentParams(), copies=2, seed=0,
                preview_images=2)
    seen = {}
    real_fit = stage.fit

    def spy(model, train, val, cfg, **kw):
        seen["train"] = train
        return real_fit(model, train, val, cfg, **kw)

    monkeypatch.setattr(stage, "fit", spy)
    result, _ = _run(split_dir, tmp_path / "a", augmented=aug)
    meta = json.loads((tmp_path / "a/features/meta.json").read_text())
    assert meta["augmented"]["count"] == 120 and meta["augmented"]["precision"] == "bf16"
    train = seen["train"]
    assert train.images.shape == (180, 1280) and train.versions.shape == (60, 3)
    copies = torch.load(tmp_path / "a/features/augmented.pt", weights_only=True)["features"]
    assert torch.equal(train.images[60:], copies) and not torch.equal(train.images[:60], copies[::2])
    capsys.readouterr()
    _run(split_dir, tmp_path / "a", augmented=aug)  # everything reused, copies included
    assert capsys.readouterr().out.count("reusing cached") == 4
    # new pixels under the same file names (another policy): the copies' features are recomputed
    run_augment(split_dir, aug, tmp_path / "preview.png", policy_params=AugmentParams(rotation=90.0), copies=2,
                seed=0, preview_images=2)
    again, _ = _run(split_dir, tmp_path / "a", augmented=aug)
    assert capsys.readouterr().out.count("reusing cached") == 3 and again["extract_images_per_second"] > 0


def test_offline_without_weights_is_a_clear_error(split_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    from cnnlab.models.backbones import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError, match="resnet18"):
        _run(split_dir, tmp_path / "b", FeatureExtractConfig(**{**FX.__dict__, "backbone": "resnet18"}))
    # refused before any MLflow run was opened: nothing half-done in the store
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_experiment_by_name("t") is None
