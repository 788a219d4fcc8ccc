"""The train stage's work for one variant, against a real MLflow store in a temp dir."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from cnnlab.config import AugmentParams, TrainParams
from cnnlab.data.augment import run_augment
from cnnlab.data.split import read_manifest, run_split
from cnnlab.training import TrainOutputs, train_variant

TINY = TrainParams(epochs=2, batch_size=16, early_stopping_patience=None, arch="tinyvgg",
                   arch_kwargs={"hidden_units": 4})


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the default artifact root (./mlruns) lands in the temp dir
    return uri


@pytest.fixture
def data_dirs(tiny_idx: Path, tmp_path: Path) -> tuple[Path, Path]:
    split, aug = tmp_path / "split", tmp_path / "aug"
    run_split(tiny_idx, split, seed=0, val_fraction=0.2, test_fraction=0.2, max_train_per_class=6,
              max_val_per_class=3, max_test_per_class=2, max_image_pixels=10_000, max_side=None, color_mode="auto")
    run_augment(split, aug, tmp_path / "preview.png", policy_params=AugmentParams(), copies=1, seed=0,
                preview_images=2)
    return split, aug


def _train(split: Path, aug: Path | None, out_root: Path, variant: str = "regularized", **kw):
    out = TrainOutputs(model_dir=out_root / "model", metrics=out_root / "metrics.json",
                       history=out_root / "history.csv", curves=out_root / "curves.png",
                       checkpoint=out_root / "ckpt.pt")
    args = dict(variant=variant, split_dir=split, augmented_dir=aug, on_the_fly=False, dropout=0.5, cfg=TINY,
                seed=0, experiment="test", logged_params={"variant": variant, "train": TINY.model_dump()}, out=out)
    args.update(kw)
    return train_variant(**args), out


def test_train_variant_writes_outputs_and_a_complete_mlflow_run(store: str, data_dirs, tmp_path: Path):
    split, aug = data_dirs
    result, out = _train(split, aug, tmp_path / "a")
    run = mlflow.MlflowClient().get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["variant"] == "regularized" and run.data.tags["stage"] == "train"
    assert run.data.params["train.arch"] == "tinyvgg"
    history = mlflow.MlflowClient().get_metric_history(result["run_id"], "val_accuracy")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result["run_id"], "plots")}
    assert artifacts == {"plots/history.csv", "plots/curves.png"}
    assert json.loads((out.model_dir / "run.json").read_text())["run_id"] == result["run_id"]
    assert not out.checkpoint.exists()  # removed once the stage succeeded
    metrics = json.loads(out.metrics.read_text())
    assert set(metrics) == {"val_accuracy", "val_loss", "best_epoch", "epochs_run", "stopped_early", "parameters"}
    assert len(pd.read_csv(out.history)) == 2
    # the logged model serves the raw PNG bytes of a validation image
    model = mlflow.pyfunc.load_model(result["model_uri"])
    rows = read_manifest(split, "val")[:3]
    pred = model.predict(pd.DataFrame({"image": [Path(r["path"]).read_bytes() for r in rows]}))
    assert list(pred.columns[:3]) == ["label", "label_id", "confidence"] and len(pred) == 3


def test_same_params_same_metrics_file(store: str, data_dirs, tmp_path: Path):
    split, aug = data_dirs
    _, a = _train(split, aug, tmp_path / "a")
    _, b = _train(split, aug, tmp_path / "b")
    assert a.metrics.read_bytes() == b.metrics.read_bytes()
    _, c = _train(split, aug, tmp_path / "c", seed=1)
    assert json.loads(a.metrics.read_text()) != json.loads(c.metrics.read_text())


def test_scratch_uses_originals_only_and_on_the_fly_uses_the_policy(store: str, data_dirs, tmp_path: Path):
    split, aug = data_dirs
    r1, _ = _train(split, None, tmp_path / "s", variant="scratch", dropout=0.0)
    r2, _ = _train(split, aug, tmp_path / "f", variant="fly", on_the_fly=True)
    for r in (r1, r2):
        assert mlflow.MlflowClient().get_run(r["run_id"]).info.status == "FINISHED"


def test_a_failing_run_is_marked_failed(store: str, data_dirs, tmp_path: Path, monkeypatch):
    split, aug = data_dirs

    def fit(*args, **kwargs):  # a failure inside the run, e.g. out of memory in an epoch
        raise RuntimeError("boom")

    monkeypatch.setattr("cnnlab.training.fit", fit)
    with pytest.raises(RuntimeError, match="boom"):
        _train(split, aug, tmp_path / "x")
    runs = mlflow.search_runs(experiment_names=["test"])
    assert list(runs["status"]) == ["FAILED"]


def test_a_precision_the_device_cannot_run_is_refused_before_any_run(store: str, data_dirs, tmp_path: Path):
    split, aug = data_dirs
    broken = TINY.model_copy(update={"precision": "fp16", "device": "cpu"})
    with pytest.raises(ValueError, match="fp16' needs CUDA"):
        _train(split, aug, tmp_path / "x", cfg=broken)
    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("test")
    assert experiment is None or not client.search_runs([experiment.experiment_id])


def test_stale_augment_output_is_a_clear_error(store: str, data_dirs, tmp_path: Path):
    split, aug = data_dirs
    (aug / "train.csv").write_text("path,label,class,source\nimages/x.png,0,a,images/train/nope.png\n")
    with pytest.raises(ValueError, match="augment stage is out of date"):
        _train(split, aug, tmp_path / "x")
