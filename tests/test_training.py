"""The scratch stage's work for one variant, against a real MLflow store in a temp dir."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cnnlab.config import AugmentParams, ColorJitterParams, RuntimeParams
from cnnlab.data.augment import run_augment
from cnnlab.data.shards import iter_images, read_manifest
from cnnlab.data.split import run_split
from cnnlab.data.tensors import TrainSet
from cnnlab.training import engine
from helpers.served import publish_variant
from helpers.variant_runs import SPLIT, TINY, train_scratch

SIZE = TINY.image_size  # the size the augment stage makes its copies at: the variants' input size

@pytest.fixture
def data_dirs(tiny_idx: Path, tmp_path: Path) -> tuple[Path, Path]:
    split, aug = tmp_path / "split", tmp_path / "aug"
    run_split(tiny_idx, split, SPLIT, seed=0)
    run_augment(split, aug, tmp_path / "preview.png", AugmentParams(copies=1, preview_images=2), seed=0, size=SIZE)
    return split, aug


def test_train_variant_writes_outputs_and_a_complete_mlflow_run(store: str, data_dirs, tmp_path: Path):
    split, aug = data_dirs
    result, out = train_scratch(split, aug, tmp_path / "a")
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["variant"] == "regularized" and run.data.tags["stage"] == "scratch@regularized"
    assert run.data.params["scratch.arch"] == "tinyvgg"
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "plots")}
    assert artifacts == {"plots/history.csv", "plots/curves.png"}
    assert json.loads((out.model_dir / "run.json").read_text())["run_id"] == result.run_id
    assert not out.checkpoint.exists()  # removed once the stage succeeded
    metrics = json.loads(out.metrics.read_text())
    assert set(metrics) == {"val_accuracy", "val_loss", "best_epoch", "epochs_run", "stopped_early", "parameters"}
    assert len(pd.read_csv(out.history)) == 2
    # the run holds the trained files; `register` makes the servable pyfunc from them, once
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "classifier")}
    assert files == {"classifier/spec.json", "classifier/weights.pt"}
    uri = publish_variant(result.run_id, out.model_dir, split)
    assert publish_variant(result.run_id, out.model_dir, split) == uri  # reused, not logged twice
    after = mlflow.MlflowClient().get_run(result.run_id)
    assert after.info.status == "FINISHED" and after.data.tags["params_hash"] == run.data.tags["params_hash"]
    # the logged model serves the stored PNG bytes of a validation image
    model = mlflow.pyfunc.load_model(uri)
    images = list(iter_images(split, "val", limit=3))
    assert len(images) == 3
    pred = model.predict(pd.DataFrame({"image": images}))
    assert list(pred.columns[:3]) == ["label", "label_id", "confidence"] and len(pred) == 3


def test_same_params_same_metrics_file(store: str, data_dirs, tmp_path: Path):
    split, aug = data_dirs
    _, a = train_scratch(split, aug, tmp_path / "a")
    _, b = train_scratch(split, aug, tmp_path / "b")
    assert a.metrics.read_bytes() == b.metrics.read_bytes()
    _, c = train_scratch(split, aug, tmp_path / "c", seed=1)
    assert json.loads(a.metrics.read_text()) != json.loads(c.metrics.read_text())


def _decoded(images: list[bytes]) -> torch.Tensor:
    """Stored PNGs as (N, 1, 28, 28) uint8, decoded here with PIL (the tiny split is grey, 28 px)."""
    out = []
    for data in images:
        with Image.open(io.BytesIO(data)) as im:
            out.append(torch.from_numpy(np.array(im))[None])
    return torch.stack(out)


@dataclass
class FitCall:
    train: TrainSet
    augment: object
    batches: list[torch.Tensor] = field(default_factory=list)  # what the model got while training
    augmented: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # augment's (in, out)


@pytest.fixture
def fit_spy(monkeypatch: pytest.MonkeyPatch) -> list[FitCall]:
    """Wraps the real `fit`: records the training set and augment callable it gets, the inputs and
    outputs of that callable, and every batch the model is fed in training mode."""
    calls: list[FitCall] = []

    def spy(model, train, val, cfg, **kw):
        hooks = kw.get("hooks", engine.Hooks())
        call = FitCall(train=train, augment=hooks.augment)
        calls.append(call)
        if call.augment is not None:
            real_augment = call.augment

            def recording(img):
                out = real_augment(img)
                call.augmented.append((img.clone(), out.clone()))
                return out

            kw["hooks"] = replace(hooks, augment=recording)
        model.register_forward_pre_hook(
            lambda mod, args: call.batches.append(args[0].clone()) if mod.training else None)
        return engine.fit(model, train, val, cfg, **kw)

    monkeypatch.setattr("cnnlab.stages.variant.fit", spy)
    return calls


def _rows(t: torch.Tensor) -> list[bytes]:
    return sorted(bytes(x.contiguous().numpy()) for x in t)


def test_each_variant_trains_on_the_data_it_names(store: str, data_dirs, tmp_path: Path, fit_spy):
    """scratch: the split's originals only; regularized: originals and the augment stage's copies;
    on the fly: the originals, augmented afresh by the stored policy for every batch."""
    split, aug = data_dirs
    rows = read_manifest(split, "train")
    originals = _decoded(list(iter_images(split, "train")))
    labels = torch.tensor([r["label"] for r in rows])
    # each original's copy (one per image), by the original's key
    copies = {r["source"]: data for r, data in zip(read_manifest(aug, "train"), iter_images(aug, "train"), strict=True)}
    n = len(rows)
    assert n == 60  # 6 per class

    train_scratch(split, None, tmp_path / "s", variant="scratch", dropout=0.0)
    train_scratch(split, aug, tmp_path / "r")
    train_scratch(split, aug, tmp_path / "f", variant="fly", on_the_fly=True)
    scratch, regularized, fly = fit_spy

    # scratch: one version per image, the stored originals, no augmentation
    assert scratch.augment is None
    assert torch.equal(scratch.train.versions, torch.arange(n)[:, None])
    assert torch.equal(scratch.train.images, originals) and torch.equal(scratch.train.labels, labels)
    fed = torch.cat(scratch.batches)
    assert len(fed) == TINY.epochs * n
    for epoch in range(TINY.epochs):  # each epoch shows every original once, unchanged
        assert _rows(fed[epoch * n:(epoch + 1) * n]) == _rows(originals)

    # regularized: versions [original, its copy]; the copy is the augment stage's file for it
    assert regularized.augment is None
    versions = regularized.train.versions
    assert versions.shape == (n, 2) and torch.equal(versions[:, 0], torch.arange(n))
    assert torch.equal(regularized.train.images[versions[:, 0]], originals)
    assert len(copies) == n
    stored = _decoded([copies[r["key"]] for r in rows])
    assert torch.equal(regularized.train.images[versions[:, 1]], stored)
    assert torch.equal(regularized.train.labels[versions[:, 1]], labels)
    assert not torch.equal(stored, originals)
    fed = torch.cat(regularized.batches)
    allowed = set(_rows(originals)) | set(_rows(stored))
    assert len(fed) == TINY.epochs * n and set(_rows(fed)) <= allowed
    assert set(_rows(fed)) & set(_rows(stored))  # copies are drawn, not just originals

    # on the fly: originals only, plus the stored policy applied to each one as it is batched
    assert fly.augment is not None
    assert torch.equal(fly.train.versions, torch.arange(n)[:, None])
    assert torch.equal(fly.train.images, originals)
    ins = torch.stack([i for i, _ in fly.augmented])
    outs = torch.stack([o for _, o in fly.augmented])
    assert len(ins) == TINY.epochs * n and set(_rows(ins)) == set(_rows(originals))
    changed = sum(not torch.equal(i, o) for i, o in fly.augmented)
    assert changed >= 0.9 * len(ins), f"only {changed} of {len(ins)} images changed by the policy"
    # and the model is fed exactly what the policy made, not the stored originals
    assert torch.equal(torch.cat(fly.batches), outs)


def test_on_the_fly_feeds_the_stored_policy_s_transform_of_each_original(
    store: str, tiny_idx: Path, tmp_path: Path, fit_spy
):
    """A policy with one certain outcome (both flips always, everything else off): every epoch the
    model must be fed each original turned by 180 degrees, never the original itself. The policy
    comes from the augment folder's policy.json, not from the defaults."""
    split, aug = tmp_path / "split", tmp_path / "aug"
    run_split(tiny_idx, split, SPLIT, seed=0)
    turn = AugmentParams(hflip=1.0, vflip=1.0, rotation=0.0, translate=0.0, scale=[1.0, 1.0], shear=0.0,
                         color_jitter=ColorJitterParams(), random_erasing=0.0, copies=1, preview_images=2)
    run_augment(split, aug, tmp_path / "preview.png", turn, seed=0, size=SIZE)
    originals = _decoded(list(iter_images(split, "train")))
    turned = originals.flip(-1, -2)
    assert not set(_rows(turned)) & set(_rows(originals))  # so a fed original cannot pass for a turned one

    train_scratch(split, aug, tmp_path / "f", variant="fly", on_the_fly=True)
    (fly,) = fit_spy
    fed, n = torch.cat(fly.batches), len(originals)
    assert len(fed) == TINY.epochs * n
    for epoch in range(TINY.epochs):
        assert _rows(fed[epoch * n:(epoch + 1) * n]) == _rows(turned)


def test_a_failing_run_is_marked_failed(store: str, data_dirs, tmp_path: Path, monkeypatch):
    split, aug = data_dirs

    def fit(*args, **kwargs):  # a failure inside the run, e.g. out of memory in an epoch
        raise RuntimeError("boom")

    monkeypatch.setattr("cnnlab.stages.variant.fit", fit)
    with pytest.raises(RuntimeError, match="boom"):
        train_scratch(split, aug, tmp_path / "x")
    runs = mlflow.search_runs(experiment_names=["test"])
    assert list(runs["status"]) == ["FAILED"]


def test_a_precision_the_device_cannot_run_is_refused_before_any_run(store: str, data_dirs, tmp_path: Path):
    split, aug = data_dirs
    broken = TINY.model_copy(update={"runtime": RuntimeParams(precision="fp16", device="cpu")})
    with pytest.raises(ValueError, match="fp16' needs CUDA"):
        train_scratch(split, aug, tmp_path / "x", cfg=broken)
    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("test")
    assert experiment is None or not client.search_runs([experiment.experiment_id])


def test_stale_augment_output_is_a_clear_error(store: str, data_dirs, tmp_path: Path):
    split, aug = data_dirs
    # a copy of an image the split no longer has (the manifest's fields as the augment stage writes them)
    shard = json.loads((aug / "shards.json").read_text())["train"][0]["file"]
    (aug / "train.csv").write_text("key,label,class,source,shard,row,format,stored\n"
                                   f"a/nope-aug0,0,a,a/nope,{shard},0,png,augmented\n")
    with pytest.raises(ValueError, match="augment stage is out of date"):
        train_scratch(split, aug, tmp_path / "x")
