"""End to end: a real `dvc repro` of the data stages on the real default source, tiny caps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _workspace(tmp_path: Path, **overrides: dict) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    for name in ("dvc.yaml", "params.yaml", "pipeline", "src", "data/local"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, ws / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=ws, check=True)
    return ws


def _dvc(ws: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ws / "src")}
    env.pop("MLFLOW_TRACKING_URI", None)  # the stages' default: sqlite:///mlflow.db in the workspace
    return subprocess.run([BIN / "dvc", *args], cwd=ws, env=env, capture_output=True, text=True, timeout=600)


TINY = {"split": {"max_train_per_class": 5, "max_val_per_class": 3, "max_test_per_class": 4},
        "augment": {"copies": 1, "preview_images": 3}}


def test_repro_augment_then_nothing_then_only_what_changed(tmp_path: Path):
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST is not installed: run `make data-deps` (make test does it)")
    ws = _workspace(tmp_path, **TINY)
    first = _dvc(ws, "repro", "augment")
    assert first.returncode == 0, first.stdout + first.stderr
    split = json.loads((ws / "data/metrics/split.json").read_text())
    assert (split["train_images"], split["val_images"], split["test_images"]) == (50, 30, 40)
    assert split["color_mode"] == "L" and split["quarantined"] == 0
    assert json.loads((ws / "data/metrics/augment.json").read_text())["augmented_images"] == 50
    assert len((ws / "data/augmented/train.csv").read_text().splitlines()) == 51
    assert (ws / "data/plots/augment_preview.png").stat().st_size > 1000

    second = _dvc(ws, "repro", "augment")
    assert second.returncode == 0
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date" in second.stdout

    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["augment"]["copies"] = 2
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _dvc(ws, "repro", "augment")
    assert third.returncode == 0, third.stderr
    assert "Running stage 'augment'" in third.stdout
    assert "Running stage 'split'" not in third.stdout and "Running stage 'download'" not in third.stdout
    assert json.loads((ws / "data/metrics/augment.json").read_text())["augmented_images"] == 100


def test_bad_params_stop_the_stage_with_a_clear_message(tmp_path: Path):
    ws = _workspace(tmp_path, split={"max_train_per_class": 0})
    result = _dvc(ws, "repro", "download")
    assert result.returncode != 0
    assert "split.max_train_per_class = 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (ws / "data/raw").exists()


def test_local_source_with_bad_images_quarantines_them(tmp_path: Path):
    from conftest import make_image_folder

    ws = _workspace(tmp_path, download={"source": "local", "local_dir": "data/local"},
                    split={"max_train_per_class": None, "max_val_per_class": None, "max_test_per_class": None})
    make_image_folder(ws / "data/local", {"cats": 6, "dogs": 6}, ext="jpg")
    (ws / "data/local/cats/broken.jpg").write_bytes(b"")
    result = _dvc(ws, "repro", "split")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 file(s) quarantined" in result.stdout
    quarantine = (ws / "data/split/quarantine.csv").read_text()
    assert "images/cats/broken.jpg,empty file" in quarantine
    # DVC watches the local folder: adding an image re-runs download and split.
    make_image_folder(ws / "data/local", {"cats": 7}, ext="jpg")
    again = _dvc(ws, "repro", "split")
    assert "Running stage 'download'" in again.stdout and "Running stage 'split'" in again.stdout


def test_full_repro_trains_both_variants_into_mlflow_deterministically(tmp_path: Path):
    import mlflow

    ws = _workspace(tmp_path, **TINY, train={"epochs": 2, "arch": "tinyvgg", "arch_kwargs": {"hidden_units": 4}},
                    feature_extract={"image_size": 32}, fine_tune={"epochs": 1})
    result = _dvc(ws, "repro")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shown = _dvc(ws, "metrics", "show", "--json")
    metrics = json.loads(shown.stdout)
    files = next(iter(metrics.values()))["data"]
    variants = ("scratch", "regularized", "feature_extract", "fine_tune")
    assert {f"data/metrics/{v}.json" for v in variants} <= set(files)
    runs = {}
    for variant in variants:
        run = json.loads((ws / f"data/models/{variant}/run.json").read_text())
        runs[variant] = run["run_id"]
        assert (ws / f"data/plots/{variant}/curves.png").exists()
    client = mlflow.MlflowClient(f"sqlite:///{ws}/mlflow.db")
    for variant, run_id in runs.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["variant"] == variant
        if variant in ("scratch", "regularized"):
            expected = yaml.safe_load((ws / "params.yaml").read_text())["variants"][variant]["dropout"]
            assert run.data.params["dropout"] == str(expected)
        assert {"train_loss", "val_loss", "train_accuracy", "val_accuracy"} <= set(run.data.metrics)

    # evaluate: every variant and the ensemble on the test split, pairwise McNemar tests.
    evaluated = json.loads((ws / "data/metrics/evaluate.json").read_text())
    assert set(variants) | {"ensemble", "mcnemar"} <= set(evaluated)
    for variant in variants:
        test = evaluated[variant]
        assert test["test_accuracy_ci_low"] <= test["test_accuracy"] <= test["test_accuracy_ci_high"]
        assert client.get_run(runs[variant]).data.metrics["test_accuracy"] == pytest.approx(test["test_accuracy"])
    table = (ws / "data/evaluation/comparison.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in table[1:]] == [*variants, "ensemble"]
    # register: one version per variant, the alias on the best validation accuracy.
    registry = json.loads((ws / "data/registry.json").read_text())
    val = {v: json.loads((ws / f"data/metrics/{v}.json").read_text())["val_accuracy"] for v in variants}
    assert registry["champion"] == max(variants, key=lambda v: (val[v], -variants.index(v)))
    champion = client.get_model_version_by_alias(registry["model_name"], "champion")
    assert champion.tags["variant"] == registry["champion"] and champion.run_id == runs[registry["champion"]]
    assert sorted(registry["versions"]) == sorted(variants)

    before = (ws / "data/metrics/scratch.json").read_bytes()
    again = _dvc(ws, "repro", "--force", "train@scratch")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (ws / "data/metrics/scratch.json").read_bytes() == before
