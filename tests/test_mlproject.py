"""The MLproject entry points, run as `mlflow run` runs them, in a throwaway copy of the project.

`scratch -P variant=...` must hand over to `dvc repro scratch@<variant>` (which runs the stages it
needs first, with the workspace's params.yaml), and `predict` must classify with the model that
run logged. The source is a folder of colour photos split with ``color_mode: grey``, so the same
run also shows grey data going through the real pipeline into a one-channel model.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from conftest import make_image_folder, use_mlflow_store
from helpers.served import publish_variant
from PIL import Image
from project_copy import copy_project, project_params, tool_env

from cnnlab.data.shards import iter_images

pytestmark = pytest.mark.slow  # `dvc repro` and two `mlflow run` processes

BIN = Path(sys.executable).parent
CLASSES = {"red": 8, "green": 8, "blue": 8}
SMALL = {"download": {"source": "local", "local_dir": "data/local"},
         "split": {"max_train_per_class": 5, "max_val_per_class": 6, "max_test_per_class": 4, "color_mode": "grey"},
         "scratch": {"epochs": 2, "lr": 0.01, "arch": "tinyvgg", "arch_kwargs": {"hidden_units": 4}}}


def _workspace(root: Path) -> Path:
    """The project's pipeline, code, MLproject and params (`SMALL` on top), with colour photos in
    data/local, as a DVC repository without git."""
    ws = copy_project(root / "ws", project_params(**SMALL), git=False,
                      names=("dvc.yaml", "pipeline", "src", ".dvcignore", "MLproject", "python_env.yaml"))
    make_image_folder(ws / "data" / "local", CLASSES, size=(24, 20), mode="RGB")
    return ws


def _mlflow_run(ws: Path, uri: str, entry_point: str, **parameters: str) -> subprocess.CompletedProcess:
    env = tool_env(ws, {"MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true"})
    for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        env.pop(var, None)  # an earlier test's mlflow.set_experiment exports its (other store's) id
    args = [arg for k, v in parameters.items() for arg in ("-P", f"{k}={v}")]
    done = subprocess.run([str(BIN / "mlflow"), "run", str(ws), "-e", entry_point, "--env-manager", "local", *args],
                          cwd=ws, env=env, capture_output=True, text=True, timeout=1800)  # the machine is shared
    assert done.returncode == 0, f"mlflow run -e {entry_point}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


def _project_run(client: mlflow.MlflowClient, entry_point: str) -> mlflow.entities.Run:
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`mlflow.project.entryPoint` = '{entry_point}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_scratch_and_predict_entry_points_on_a_grey_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = _workspace(tmp_path)
    uri = use_mlflow_store(monkeypatch, ws)  # the stages' default store is this one too
    client = mlflow.MlflowClient(uri)

    _mlflow_run(ws, uri, "scratch", variant="scratch")
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert {"download", "split", "scratch@scratch"} <= set(lock)
    # only scratch@scratch and what it needs ran: no other variant, nothing downstream
    assert not [s for s in lock if "@" in s and s != "scratch@scratch"] and not {"evaluate", "register"} & set(lock)
    stored = list(iter_images(ws / "data" / "split", "train"))
    assert stored
    for data in stored:
        with Image.open(io.BytesIO(data)) as im:
            assert im.mode == "L"  # the colour photos, made grey by color_mode
    spec = json.loads((ws / "data" / "models" / "scratch" / "spec.json").read_text())
    assert spec["mode"] == "L" and len(spec["mean"]) == 1 and spec["classes"] == sorted(CLASSES)

    project = _project_run(client, "scratch")
    assert project.info.status == "FINISHED" and project.data.params == {"variant": "scratch"}
    info = json.loads((ws / "data" / "models" / "scratch" / "run.json").read_text())
    stage_run = client.get_run(info["run_id"])
    assert stage_run.info.run_id != project.info.run_id  # the stage's own run, not the wrapper's
    assert stage_run.info.status == "FINISHED" and stage_run.data.tags["stage"] == "scratch@scratch"
    assert client.get_experiment(stage_run.info.experiment_id).name == "cnnlab"

    model_uri = publish_variant(info["run_id"], ws / "data" / "models" / "scratch", ws / "data" / "split")
    photos = tmp_path / "photos"
    make_image_folder(photos, {"x": 3}, size=(30, 26), mode="RGB")
    done = _mlflow_run(ws, uri, "predict", path=str(photos), model=model_uri)
    want = mlflow.pyfunc.load_model(model_uri).predict(
        pd.DataFrame({"image": [p.read_bytes() for p in sorted((photos / "x").iterdir())]}))
    table = {cells[0]: cells for line in done.stdout.splitlines() if (cells := line.split())}
    for path, label, confidence in zip(sorted((photos / "x").iterdir()), want["label"], want["confidence"]):
        row = table[str(path)]
        assert row[1] == label and float(row[2]) == pytest.approx(confidence, abs=1e-4), done.stdout
    predict = _project_run(client, "predict")
    assert predict.info.status == "FINISHED"
    assert predict.data.params == {"path": str(photos), "model": model_uri}
