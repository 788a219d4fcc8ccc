"""The registry stage against a real MLflow store: versions per variant, the alias by validation
accuracy only, idempotent re-runs, and clear errors."""

from __future__ import annotations

import io
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image

from conftest import use_mlflow_store
from helpers.served import serve_and_predict
from cnnlab.data.shards import ShardWriter
from cnnlab.data.preprocess import prepare
from cnnlab.models.classifier import ModelSpec, build_classifier, load_classifier, save_classifier
from cnnlab.tracking.model_registry import Candidate, RegistryError, choose_champion, read_candidate, register_variants
from cnnlab.serving.pyfunc import log_classifier
from cnnlab.tracking.runs import tracked_run

REPO = Path(__file__).resolve().parents[1]
CLASSES = [str(i) for i in range(10)]


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


def log_variant(root: Path, variant: str, val_accuracy: float) -> Candidate:
    """A real logged pyfunc in a real run, plus the stage outputs the registry reads."""
    spec = ModelSpec(kind="scratch", arch="tinyvgg", classes=CLASSES, mode="L", image_size=28, mean=[0.5],
                     std=[0.25], kwargs={"hidden_units": 2})
    model_dir = root / "models" / variant
    save_classifier(build_classifier(spec), spec, model_dir)
    with tracked_run(experiment="reg-test", run_name=variant, tags={"variant": variant}, params={}) as run:
        info = log_classifier(model_dir, example_images=[_png(0)])
    (model_dir / "run.json").write_text(json.dumps({"run_id": run.info.run_id, "val_accuracy": val_accuracy}))
    (root / "metrics").mkdir(exist_ok=True)
    split = root / "split"  # what the register stage reads for the served model's input example
    split.mkdir(exist_ok=True)
    shards = ShardWriter(split, "val", CLASSES)
    shards.add(_png(1), key="0/a", label=0, cls=CLASSES[0], source="a.png", fmt="png", stored="original")
    shards.close()
    # ... and the test images its ONNX graph is checked on.
    shards = ShardWriter(split, "test", CLASSES)
    for i in range(6):
        shards.add(_png(10 + i), key=f"{i % 2}/t{i}", label=i % 2, cls=CLASSES[i % 2], source=f"t{i}.png", fmt="png",
                   stored="original")
    shards.close()
    return dataclasses.replace(read_candidate(variant, model_dir, None), model_uri=info.model_uri)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    mlflow.set_tracking_uri(use_mlflow_store(monkeypatch, tmp_path))
    return MlflowClient()


def test_champion_is_chosen_by_validation_never_by_test() -> None:
    a = Candidate("a", "r1", model_uri="models:/m-1", val_accuracy=0.90, test_accuracy=0.80)
    b = Candidate("b", "r2", model_uri="models:/m-2", val_accuracy=0.85, test_accuracy=0.99)
    assert choose_champion([a, b]).variant == "a"
    tie = Candidate("c", "r3", model_uri="models:/m-3", val_accuracy=0.90, test_accuracy=0.95)
    assert choose_champion([a, tie]).variant == "a"  # a tie goes to the first listed
    assert choose_champion([tie, a]).variant == "c"
    with pytest.raises(RegistryError, match="no variants"):
        choose_champion([])


def test_register_is_idempotent_and_moves_the_alias_only_on_change(store: MlflowClient, tmp_path: Path) -> None:
    cands = [log_variant(tmp_path, "scratch", 0.80), log_variant(tmp_path, "fine_tune", 0.90)]
    first = register_variants(store, "clf", "champion", cands)
    assert first.champion == "fine_tune" and first.previous_version is None and first.moved
    assert set(first.created) == {"scratch", "fine_tune"}
    champ = store.get_model_version_by_alias("clf", "champion")
    assert champ.version == first.versions["fine_tune"]
    assert champ.tags["variant"] == "fine_tune" and champ.tags["val_accuracy"] == "0.9000"
    assert champ.run_id == cands[1].run_id
    # The alias serves the very model the stage logged.
    loaded = mlflow.pyfunc.load_model("models:/clf@champion")
    assert loaded.metadata.run_id == cands[1].run_id

    again = register_variants(store, "clf", "champion", cands)
    assert again.created == () and not again.moved and again.versions == first.versions
    assert len(store.search_model_versions("name='clf'")) == 2

    # Validation results change so that scratch now wins: the alias follows, no new versions.
    flipped = [Candidate(**{**vars(c), "val_accuracy": 0.95}) if c.variant == "scratch" else c for c in cands]
    moved = register_variants(store, "clf", "champion", flipped)
    assert moved.champion == "scratch" and moved.moved and moved.previous_version == first.versions["fine_tune"]
    assert store.get_model_version_by_alias("clf", "champion").version == first.versions["scratch"]

    # Retraining the champion logs a new model in a new run: a new version, and the alias moves to it.
    retrained = log_variant(tmp_path, "scratch", 0.96)
    after = register_variants(store, "clf", "champion", [retrained, cands[1]])
    assert after.created == ("scratch",) and after.moved
    assert int(after.versions["scratch"]) == 3


def test_an_experiment_registers_its_versions_but_leaves_the_alias(store: MlflowClient, tmp_path: Path) -> None:
    """What `register` does inside a DVC experiment: new versions carry the experiment's tags,
    versions it reuses keep theirs, and the alias stays where the workspace put it."""
    scratch, fine_tune = log_variant(tmp_path, "scratch", 0.80), log_variant(tmp_path, "fine_tune", 0.90)
    base = register_variants(store, "clf", "champion", [scratch])
    exp = register_variants(store, "clf", "champion", [scratch, fine_tune], promote=False,
                            tags={"dvc.exp_name": "gusty-kite"})
    assert exp.champion == "fine_tune" and not exp.promoted and not exp.moved
    assert store.get_model_version_by_alias("clf", "champion").version == base.versions["scratch"]
    new = store.get_model_version("clf", exp.versions["fine_tune"])
    reused = store.get_model_version("clf", exp.versions["scratch"])
    assert new.tags["dvc.exp_name"] == "gusty-kite" and "dvc.exp_name" not in reused.tags


def test_a_run_missing_from_the_store_is_a_clear_error(store: MlflowClient) -> None:
    ghost = Candidate("scratch", "0" * 32, model_uri="models:/m-0123", val_accuracy=0.5)
    with pytest.raises(RegistryError, match=r"run 0{32} is not in the tracking store.*scratch@scratch"):
        register_variants(store, "clf", "champion", [ghost])


def _stage(tmp_path: Path, *variants: str, ensembles: dict | None = None,
           serving: dict | None = None) -> subprocess.CompletedProcess:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["serving"].update(serving or {})
    params["variants"] = {"scratch": {v: {} for v in variants}, "feature_extract": {}, "fine_tune": {},
                          "ensemble": ensembles or {}}
    params["registry"]["model_name"] = "stage-clf"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return subprocess.run(
        [sys.executable, str(REPO / "pipeline" / "register.py"), "--params", "params.yaml", "--models", "models",
         "--split", "split", "--test-metrics", "metrics/evaluate.json", "--ensembles", "ensembles.json",
         "--out", "registry.json"],
        cwd=tmp_path, capture_output=True, text=True, env=os.environ.copy(), timeout=120)


def test_stage_writes_the_registry_summary_and_reads_test_accuracy(store: MlflowClient, tmp_path: Path) -> None:
    log_variant(tmp_path, "scratch", 0.70)
    log_variant(tmp_path, "regularized", 0.75)
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps({"scratch": {"test_accuracy": 0.99},
                                                                    "regularized": {"test_accuracy": 0.5,
                                                                                    "temperature": 2.5,
                                                                                    "conformal_threshold": 0.25,
                                                                                    "tta_used": 1.0}}))
    done = _stage(tmp_path, "scratch", "regularized")
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "registry.json").read_text())
    assert summary["champion"] == "regularized" and summary["chosen_by"] == "val_accuracy"
    assert summary["model_uri"] == "models:/stage-clf@champion"
    version = store.get_model_version("stage-clf", summary["versions"]["scratch"])
    assert version.tags["test_accuracy"] == "0.9900"
    assert "alias 'champion' -> version" in done.stdout
    # The served champion applies evaluate's temperature: softmax(logits / 2.5); scratch has none (T = 1).
    assert "scratch: no temperature or conformal threshold in the evaluate metrics" in done.stderr
    model, spec = load_classifier(tmp_path / "models" / "regularized")
    image = _png(5)
    with torch.no_grad():
        pixels = prepare(Image.open(io.BytesIO(image)), mode=spec.mode, size=spec.image_size)[None]
        # evaluate chose test-time augmentation for it: the mean of the image's and its mirror's probabilities
        mean = (torch.softmax(model(pixels).double(), 1) + torch.softmax(model(pixels.flip(-1)).double(), 1)) / 2
        logits = torch.log(mean)
    served = mlflow.pyfunc.load_model("models:/stage-clf@champion")
    assert served.model_config["temperature"] == 2.5 and served.model_config["conformal_threshold"] == 0.25
    assert served.model_config["coverage"] == 0.9  # params.yaml's evaluate.coverage, for the reader
    assert served.model_config["tta"] == ["hflip"]
    answer = served.predict(pd.DataFrame({"image": [image]}, dtype=object)).iloc[0]
    want = torch.softmax(logits / 2.5, 1)[0].numpy()
    np.testing.assert_allclose(list(answer["probabilities"].values()), want, atol=1e-6)
    # The set: classes from the most probable down while those above hold at most 0.25 (an untrained
    # net's ~0.1 each: three classes, away from the boundary).
    ranked = np.argsort(-want, kind="stable")
    above = np.cumsum(want[ranked]) - want[ranked]
    assert list(answer["prediction_set"]) == [CLASSES[k] for k, a in zip(ranked, above) if a <= 0.25]
    assert len(answer["prediction_set"]) == 3 and answer["unsure"]
    plain = mlflow.pyfunc.load_model(f"models:/stage-clf/{summary['versions']['scratch']}")
    assert plain.model_config["temperature"] == 1.0 and plain.model_config["conformal_threshold"] == 1.0
    assert plain.model_config["tta"] == []

    rerun = _stage(tmp_path, "scratch", "regularized")
    assert rerun.returncode == 0 and "unchanged" in rerun.stdout and "new versions" not in rerun.stdout
    assert json.loads((tmp_path / "registry.json").read_text())["runtime"] == "onnx"
    assert "regularized: ONNX graph checked against PyTorch on 6 test images" in done.stdout

    # serving.runtime: torch registers the PyTorch pyfunc instead, which answers the same.
    on_torch = _stage(tmp_path, "scratch", "regularized", serving={"runtime": "torch"})
    assert on_torch.returncode == 0 and "new versions for: scratch, regularized" in on_torch.stdout
    assert json.loads((tmp_path / "registry.json").read_text())["runtime"] == "torch"
    local = Path(mlflow.artifacts.download_artifacts("models:/stage-clf@champion"))
    assert (local / "pyfunc_model.py").is_file() and "torch==" in (local / "requirements.txt").read_text()
    again = mlflow.pyfunc.load_model("models:/stage-clf@champion").predict(pd.DataFrame({"image": [image]}, dtype=object))
    np.testing.assert_allclose(list(again.iloc[0]["probabilities"].values()), want, atol=1e-6)


def test_stage_names_the_missing_variant(store: MlflowClient, tmp_path: Path) -> None:
    log_variant(tmp_path, "scratch", 0.70)
    done = _stage(tmp_path, "scratch", "fine_tune")
    assert done.returncode == 1
    assert "models/fine_tune/run.json: missing" in done.stderr and "Traceback" not in done.stderr


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_stage_registers_an_ensemble_that_serves_its_members_calibrated_mean(store: MlflowClient,
                                                                            tmp_path: Path) -> None:
    """An ensemble entry becomes one version, in the run evaluate made for it; it wins champion on
    its validation accuracy, and its pyfunc answers with the mean of what its members' own served
    models answer (each with its temperature and views), calibrated by its own temperature."""
    log_variant(tmp_path, "scratch", 0.70)
    log_variant(tmp_path, "regularized", 0.75)
    with tracked_run(experiment="reg-test", run_name="duo", tags={"kind": "ensemble"}, params={}) as run:
        pass
    record = {"run_id": run.info.run_id, "variant": "duo", "val_accuracy": 0.8, "members": ["scratch", "regularized"],
              "combine": "calibrated_mean"}
    (tmp_path / "ensembles.json").write_text(json.dumps({"duo": record}))
    trust = {"scratch": {"test_accuracy": 0.6, "temperature": 2.0, "conformal_threshold": 0.5, "tta_used": 0.0},
             "regularized": {"test_accuracy": 0.7, "temperature": 0.5, "conformal_threshold": 0.5, "tta_used": 1.0},
             "duo": {"test_accuracy": 0.75, "temperature": 1.5, "conformal_threshold": 0.3}}
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps(trust))
    done = _stage(tmp_path, "scratch", "regularized", ensembles={"duo": {}})
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "registry.json").read_text())
    assert summary["champion"] == "duo" and set(summary["versions"]) == {"scratch", "regularized", "duo"}
    version = store.get_model_version("stage-clf", summary["versions"]["duo"])
    assert version.run_id == run.info.run_id and version.tags["test_accuracy"] == "0.7500"

    images = [_png(5), _png(6), _jpeg(7, (300, 200))]  # grey PNGs and a colour JPEG of another size
    frame = pd.DataFrame({"image": images}, dtype=object)
    members = [mlflow.pyfunc.load_model(f"models:/stage-clf/{summary['versions'][m]}").predict(frame)
               for m in ("scratch", "regularized")]
    mean = np.mean([np.array([list(p.values()) for p in m["probabilities"]]) for m in members], axis=0)
    served = mlflow.pyfunc.load_model("models:/stage-clf@champion")
    assert [m["name"] for m in served.model_config["members"]] == ["scratch", "regularized"]
    got = served.predict(frame)
    calibrated = np.exp(np.log(mean) / 1.5)
    np.testing.assert_allclose(np.array([list(p.values()) for p in got["probabilities"]]),
                               calibrated / calibrated.sum(1, keepdims=True), atol=1e-5)
    assert list(got["label"]) == [CLASSES[k] for k in mean.argmax(1)]
    # At temperature 1 (an operator's override) it is the members' plain mean.
    plain = mlflow.pyfunc.load_model("models:/stage-clf@champion", model_config={"temperature": 1.0}).predict(frame)
    np.testing.assert_allclose(np.array([list(p.values()) for p in plain["probabilities"]]), mean, atol=1e-5)
    # Its environment: what the ONNX members need, no more (no torch, no timm, no scikit-learn).
    requirements = Path(mlflow.artifacts.download_artifacts("models:/stage-clf@champion")) / "requirements.txt"
    names = {line.split("==")[0].lower() for line in requirements.read_text().split()}
    assert {"onnxruntime", "mlflow-skinny", "pillow"} <= names and not names & {"torch", "timm", "scikit-learn"}
    # Each member's graph was checked against its PyTorch model on the split's test images.
    parity = mlflow.MlflowClient().get_logged_model(served.metadata.model_id).tags["cnnlab.onnx_parity"]
    assert parity.startswith("scratch: ") and "test images, max |p_onnx - p_torch|" in parity

    # The real scoring server gives the same answers (one process, both members).
    over_http = serve_and_predict("models:/stage-clf@champion", tmp_path, images)
    np.testing.assert_allclose([list(p["probabilities"].values()) for p in over_http],
                               np.array([list(p.values()) for p in got["probabilities"]]), atol=1e-6)
    assert [p["prediction_set"] for p in over_http] == [list(s) for s in got["prediction_set"]]

    rerun = _stage(tmp_path, "scratch", "regularized", ensembles={"duo": {}})
    assert rerun.returncode == 0 and "unchanged" in rerun.stdout and "new versions" not in rerun.stdout
    # An evaluation of other members is stale: register says to re-run evaluate.
    stale = _stage(tmp_path, "scratch", "regularized", ensembles={"duo": {"members": ["regularized", "scratch"]}})
    assert stale.returncode == 1 and "no evaluation of ensemble 'duo' with members regularized, scratch" in stale.stderr
    assert "dvc repro evaluate" in stale.stderr and "Traceback" not in stale.stderr
