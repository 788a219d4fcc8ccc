"""`python -m cnnlab predict`, run as a user would, against a tiny registered model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import use_mlflow_store
from helpers.tiny_model import encode, register_tiny
from PIL import Image

from cnnlab.cli.predict import (
    DEFAULT_MODEL_URI,
    Outcome,
    default_model_uri,
    find_images,
    format_table,
)


@dataclass
class Store:
    root: Path  # holds mlflow.db, params.yaml naming the model, and imgs/
    uri: str  # the tracking URI
    model: mlflow.pyfunc.PyFuncModel


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        uri = use_mlflow_store(mp, root)
        register_tiny(root, uri, "cli-tiny", alias="best")
        (root / "params.yaml").write_text("registry:\n  model_name: cli-tiny\n  alias: best\n")
        images = root / "imgs"
        (images / "sub" / "deeper").mkdir(parents=True)
        (images / "b_dark.png").write_bytes(encode("RGB", (30, 20), "PNG", 1, level=30))
        (images / "a_bright.jpg").write_bytes(encode("L", (40, 40), "JPEG", 2, level=225))
        (images / "sub" / "c.PNG").write_bytes(encode("RGBA", (17, 31), "PNG", 3))
        (images / "sub" / "broken.png").write_bytes(b"GIF89a but not really")
        (images / "sub" / "deeper" / "d.webp").write_bytes(encode("RGB", (25, 25), "WEBP", 4))
        (images / "notes.txt").write_text("not an image, and skipped in folders")
        yield Store(root, uri, mlflow.pyfunc.load_model("models:/cli-tiny@best"))
        mlflow.set_tracking_uri(None)  # back to the environment's, for later modules


def cli(*args: str, cwd: Path, tracking_uri: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return subprocess.run(
        [sys.executable, "-m", "cnnlab", "predict", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def in_process(store: Store, paths: list[Path]) -> pd.DataFrame:
    return store.model.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths]}))


GOOD = ["imgs/a_bright.jpg", "imgs/b_dark.png", "imgs/sub/c.PNG", "imgs/sub/deeper/d.webp"]


@pytest.mark.slow  # a registered model and a CLI process (~10 s each)
def test_table_with_the_model_named_in_params_yaml(store: Store) -> None:
    # No MLFLOW_TRACKING_URI: the default store, ./mlflow.db, and the model params.yaml names.
    done = cli("imgs", cwd=store.root)
    assert done.returncode == 1, done.stderr  # broken.png failed
    lines = done.stdout.strip().splitlines()
    assert lines[0].split() == ["PATH", "LABEL", "CONFIDENCE", "TOP-3"]
    rows = [line.split() for line in lines[1:]]
    # Sorted, recursive, image extensions only (any case), the broken file on its own line:
    assert [r[0] for r in rows] == [GOOD[0], GOOD[1], "imgs/sub/broken.png", GOOD[2], GOOD[3]]
    assert rows[2][1:] == ["error:", "not", "an", "image", "(unrecognized", "format)"]
    want = in_process(store, [store.root / p for p in GOOD])
    good_rows = rows[:2] + rows[3:]
    assert [r[1] for r in good_rows] == want["label"].tolist()
    assert [float(r[2]) for r in good_rows] == pytest.approx(want["confidence"].tolist(), abs=1e-4)
    assert "1 of 5 path(s) failed" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow  # a registered model and a CLI process (~10 s each)
def test_json_lines_match_in_process_across_batches(store: Store, tmp_path: Path) -> None:
    files = [store.root / GOOD[0], store.root / "imgs/sub/broken.png", store.root / GOOD[1], store.root / GOOD[2]]
    done = cli(
        *map(str, files), "--json", "--batch-size", "2", "--model", "models:/cli-tiny/1",
        cwd=tmp_path, tracking_uri=store.uri,
    )
    assert done.returncode == 1, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["path"] for r in records] == list(map(str, files))
    assert records[1] == {"path": str(files[1]), "error": "not an image (unrecognized format)"}
    good = [records[0], *records[2:]]
    want = in_process(store, [files[0], *files[2:]])
    for got, (_, row) in zip(good, want.iterrows()):
        assert (got["label"], got["label_id"]) == (row["label"], row["label_id"])
        assert got["probabilities"].keys() == row["probabilities"].keys()
        np.testing.assert_allclose(list(got["probabilities"].values()), list(row["probabilities"].values()), atol=1e-6)
        assert (got["prediction_set"], got["unsure"]) == (list(row["prediction_set"]), row["unsure"])
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow  # a registered model and a CLI process (~10 s each)
def test_explain_writes_a_grad_cam_overlay_per_classified_file(store: Store, tmp_path: Path) -> None:
    files = [store.root / GOOD[0], store.root / "imgs/sub/broken.png", store.root / GOOD[3]]
    done = cli(*map(str, files), "--explain", "--explain-dir", str(tmp_path / "cams"), "--model",
               "models:/cli-tiny/1", cwd=tmp_path, tracking_uri=store.uri)
    assert done.returncode == 1, done.stderr  # broken.png: classified as an error, not explained
    written = sorted(p.name for p in (tmp_path / "cams").iterdir())
    assert written == ["a_bright.jpg.gradcam.png", "d.webp.gradcam.png"]
    assert f"wrote {tmp_path / 'cams' / 'a_bright.jpg.gradcam.png'}" in done.stderr
    with Image.open(tmp_path / "cams" / "a_bright.jpg.gradcam.png") as overlay:
        assert overlay.size[0] > 300  # the image and its map side by side


@pytest.mark.slow  # a logged ensemble and a CLI process (~15 s)
def test_explain_writes_one_overlay_per_member_of_an_ensemble(store: Store, tmp_path: Path) -> None:
    import dataclasses

    from cnnlab.models.classifier import build_classifier, load_classifier, save_classifier
    from cnnlab.serving.ensemble import log_ensemble

    model, spec = load_classifier(store.root / "tiny_model")
    save_classifier(model, spec, tmp_path / "rgb16")
    grey = dataclasses.replace(spec, mode="L", image_size=20, mean=[0.5], std=[0.25])  # another input form
    save_classifier(build_classifier(grey), grey, tmp_path / "grey20")
    mlflow.set_tracking_uri(store.uri)
    with mlflow.start_run(run_name="pair"):
        info = log_ensemble({"rgb16": tmp_path / "rgb16", "grey20": tmp_path / "grey20"},
                            {"rgb16": {"temperature": 1.0, "tta": []}, "grey20": {"temperature": 1.0, "tta": []}},
                            example_images=[encode("RGB", (20, 20), "PNG", 0)])
    done = cli(str(store.root / GOOD[0]), "--explain", "--explain-dir", str(tmp_path / "cams"), "--model",
               info.model_uri, cwd=tmp_path, tracking_uri=store.uri)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == ["a_bright.jpg.gradcam.grey20.png",
                                                                     "a_bright.jpg.gradcam.rgb16.png"]


@pytest.mark.slow  # a registered model and a CLI process (~10 s each)
def test_unknown_model_names_the_uri_and_the_fix(store: Store, tmp_path: Path) -> None:
    done = cli(str(store.root / GOOD[0]), "--model", "models:/no-such-model@champion",
               cwd=tmp_path, tracking_uri=store.uri)
    assert done.returncode == 2
    assert "models:/no-such-model@champion" in done.stderr and "dvc repro" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.slow  # a registered model and a CLI process (~10 s each)
def test_no_store_here_is_a_clear_error_and_creates_nothing(store: Store, tmp_path: Path) -> None:
    done = cli(str(store.root / GOOD[0]), cwd=tmp_path)  # no params.yaml, no mlflow.db
    assert done.returncode == 2
    assert DEFAULT_MODEL_URI in done.stderr and "mlflow.db" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # MLflow left to itself would create an empty mlflow.db


REPO = Path(__file__).resolve().parents[1]
LEVELS = {"dark": 30, "mid": 128, "bright": 225}  # what tiny_model learned to tell apart


@pytest.mark.slow  # `mlflow run` starts a CLI process (~15 s)
def test_mlproject_predict_entry_point(store: Store, tmp_path: Path) -> None:
    """`mlflow run . -e predict -P path=... -P model=...` runs `python -m cnnlab predict` with
    those parameters: each image gets the class it was made as, and MLflow records the run."""
    folder = tmp_path / "known"
    folder.mkdir()
    want = {}
    for i, (label, level) in enumerate(sorted(LEVELS.items()) * 2):
        path = folder / f"{label}_{i}.png"
        path.write_bytes(encode("RGB" if i % 2 else "L", (24, 18), "PNG", 500 + i, level=level))
        want[str(path)] = label
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [str(bin_dir / "mlflow"), "run", str(REPO), "-e", "predict", "--env-manager", "local",
         "-P", f"path={folder}", "-P", "model=models:/cli-tiny@best"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = [line.split() for line in done.stdout.splitlines()]
    rows = {cells[0]: cells for cells in table if cells and cells[0] in want}
    assert {p: r[1] for p, r in rows.items()} == want, done.stdout
    expected = in_process(store, [Path(p) for p in want])
    assert [float(rows[p][2]) for p in want] == pytest.approx(expected["confidence"].tolist(), abs=1e-4)

    client = mlflow.MlflowClient(store.uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`mlflow.project.entryPoint` = 'predict'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params == {"path": str(folder), "model": "models:/cli-tiny@best"}


def test_find_images_reports_missing_paths_and_empty_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.bin").write_bytes(b"named explicitly, so kept whatever the extension")
    files, errors = find_images([tmp_path / "x.bin", tmp_path / "missing", tmp_path / "empty", tmp_path / "x.bin"])
    assert files == [tmp_path / "x.bin"]  # listed once
    assert [(o.path.name, o.error) for o in errors] == [
        ("missing", "no such file or folder"), ("empty", "folder holds no image files")
    ]


def test_default_model_uri_reads_params_yaml(tmp_path: Path) -> None:
    assert default_model_uri(tmp_path / "params.yaml") == DEFAULT_MODEL_URI  # absent
    (tmp_path / "params.yaml").write_text("registry:\n  model_name: other\n  alias: prod\n")
    assert default_model_uri(tmp_path / "params.yaml") == "models:/other@prod"


def test_table_layout() -> None:
    outcomes = [
        Outcome(Path("long/path/one.png"), {"label": "cat", "label_id": 0, "confidence": 0.75,
                                            "probabilities": {"cat": 0.75, "dog": 0.2, "frog": 0.04, "ant": 0.01}}),
        Outcome(Path("b.png"), error="not an image (unrecognized format)"),
        Outcome(Path("c.png"), {"label": "dog", "label_id": 1, "confidence": 0.5, "prediction_set": ["dog", "cat"],
                                "unsure": True, "probabilities": {"cat": 0.4, "dog": 0.5, "frog": 0.1}}),
    ]
    assert format_table(outcomes).splitlines() == [
        "PATH               LABEL  CONFIDENCE  TOP-3",
        "long/path/one.png  cat        0.7500  cat 0.750, dog 0.200, frog 0.040",
        "b.png              error: not an image (unrecognized format)",
        "c.png              dog        0.5000  dog 0.500, cat 0.400, frog 0.100  unsure: {dog, cat}",
    ]
