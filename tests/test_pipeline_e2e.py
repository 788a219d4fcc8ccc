"""End to end: a real `dvc repro` of the data stages on the real default source, tiny caps."""

from __future__ import annotations

import dataclasses

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from project_copy import copy_project, project_params, tool_argv, tool_env

pytestmark = pytest.mark.slow


def _workspace(tmp_path: Path, **overrides: dict) -> Path:
    return copy_project(tmp_path / "ws", project_params(**overrides), git=False,
                        names=("dvc.yaml", "pipeline", "src", "data/local", ".dvcignore"))


def _dvc(ws: Path, *args: str) -> subprocess.CompletedProcess:
    # tool_env: the stages' default store, sqlite:///mlflow.db in the workspace
    return subprocess.run(tool_argv(["dvc", *args]), cwd=ws, env=tool_env(ws), capture_output=True, text=True,
                          timeout=1800)  # generous: the machine may be shared and loaded


TINY = {"split": {"max_train_per_class": 5, "max_val_per_class": 6, "max_test_per_class": 4},
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
    # The stage prints the data report: the count up top, the file and the reason below.
    assert "; 1 quarantined." in result.stdout and "images/cats/broken.jpg: empty file" in result.stdout
    quarantine = (ws / "data/split/quarantine.csv").read_text()
    assert "images/cats/broken.jpg,empty file" in quarantine
    # DVC watches the local folder: adding an image re-runs download and split.
    make_image_folder(ws / "data/local", {"cats": 7}, ext="jpg")
    again = _dvc(ws, "repro", "split")
    assert "Running stage 'download'" in again.stdout and "Running stage 'split'" in again.stdout


# Validation accuracy each variant must reach in test_full_repro... with its tiny config (10
# classes, 5 training and 3 validation images per class: chance is 0.1, and 9 of 30 right by
# guessing has probability < 1%). Measured on this config: scratch 0.70, regularized 0.60,
# feature_extract 0.43 (32 px), fine_tune 0.33 (one epoch).
BEATS_CHANCE = {"scratch": 0.4, "regularized": 0.4, "feature_extract": 0.3, "fine_tune": 0.25}
# Test accuracy the best variant must reach on the test split (4 images per class, 40 in all; never
# used to choose anything). Chance is 0.1: four variants that only guess reach 12 of 40 with
# probability < 0.2% (4 x P(Binomial(40, 0.1) >= 12)). Measured on this config: scratch 0.60
# (bootstrap interval from 0.45), regularized 0.55, feature_extract 0.45, fine_tune 0.35; the
# floor is half the best, so a slightly different CPU or library version keeps passing.
CHANCE = 0.1
TEST_FLOOR = 0.3
VARIANTS = ("scratch", "regularized", "feature_extract", "fine_tune")
METRICS_FILES = tuple(f"data/metrics/{name}.json" for name in ("split", "augment", *VARIANTS, "evaluate"))
STAGES = ("download", "split", "augment", "scratch@scratch", "scratch@regularized", "feature_extract@feature_extract",
          "fine_tune@fine_tune", "evaluate", "register")


def check_beats_chance(ws: Path) -> dict[str, float]:
    """Every variant learned something: validation accuracy well above chance (1 / classes)."""
    assert len(json.loads((ws / "data/split/classes.json").read_text())) == 10
    val = {v: json.loads((ws / f"data/metrics/{v}.json").read_text())["val_accuracy"] for v in VARIANTS}
    assert [v for v in VARIANTS if val[v] < BEATS_CHANCE[v]] == [], (val, BEATS_CHANCE)
    return val


def check_test_beats_chance(evaluated: dict) -> str:
    """The best variant on the held-out test split is right far more often than guessing; returns it.
    Its bootstrap interval must clear chance too, so one lucky draw of images cannot pass."""
    best = max(VARIANTS, key=lambda v: evaluated[v]["test_accuracy"])
    test = evaluated[best]
    assert test["test_accuracy"] >= TEST_FLOOR and test["test_accuracy_ci_low"] > CHANCE, (
        {v: evaluated[v]["test_accuracy"] for v in VARIANTS}, TEST_FLOOR)
    return best


def check_champion(ws: Path, client, runs: dict[str, str], evaluated: dict) -> None:
    """The alias is on the variant the project's own rule (`choose_champion`, as the register stage
    calls it) picks from the stage outputs; that pick must have the best validation accuracy, and
    be the first such variant in params order (docs/serving.md: a tie goes to the variant listed first), so
    a broken rule fails here rather than being agreed with. The ensemble competes too, with the
    validation accuracy evaluate gave it, in the run evaluate made for it."""
    from cnnlab.tracking.model_registry import choose_champion, read_candidate

    registry = json.loads((ws / "data/registry.json").read_text())
    ensemble = json.loads((ws / "data/ensembles.json").read_text())["ensemble"]
    assert ensemble["members"] == list(VARIANTS) and evaluated["ensemble"]["val_accuracy"] == ensemble["val_accuracy"]
    runs = {**runs, "ensemble": ensemble["run_id"]}
    val = {**{v: json.loads((ws / f"data/metrics/{v}.json").read_text())["val_accuracy"] for v in VARIANTS},
           "ensemble": ensemble["val_accuracy"]}
    names = [*VARIANTS, "ensemble"]
    candidates = [read_candidate(v, ws / "data/models" / v, evaluated) for v in VARIANTS]
    candidates.append(dataclasses.replace(candidates[0], variant="ensemble", run_id=ensemble["run_id"],
                                          val_accuracy=ensemble["val_accuracy"]))
    champion = choose_champion(candidates).variant
    assert registry["champion"] == champion
    best = max(val.values())
    assert val[champion] == best, (champion, val)
    assert [v for v in names[:names.index(champion)] if val[v] == best] == [], (champion, val)
    assert {f"{v}_vs_ensemble" for v in VARIANTS} <= set(evaluated["mcnemar"])
    version = client.get_model_version_by_alias(registry["model_name"], "champion")
    assert version.tags["variant"] == champion and version.run_id == runs[champion]
    assert sorted(registry["versions"]) == sorted(names)


def read_metrics_files(ws: Path, files: tuple[str, ...] = METRICS_FILES) -> dict[str, bytes]:
    """Every metrics file the run wrote; exactly the ones dvc.yaml declares for this config."""
    found = {p.relative_to(ws).as_posix() for p in (ws / "data/metrics").glob("*.json")}
    assert found == set(files)
    return {name: (ws / name).read_bytes() for name in files}


# Fields of the compared outputs that legitimately differ between two runs, named so that nothing
# else is let off. registry.json: a forced re-run trains new MLflow runs, which get new version
# numbers. The DVC metrics files and the histories (committed to git) have none: their writers keep
# timings out of them (cnnlab.training.outputs; evaluate's _dvc_metrics); timings go to MLflow.
RUN_DEPENDENT = {"data/registry.json": ("champion_version", "versions"),
                 # each ensemble's MLflow run, made anew by evaluate
                 "data/ensembles.json": ("run_id",)}


def read_outputs(ws: Path) -> dict[str, object]:
    """Every metrics-like output of a run, less RUN_DEPENDENT: the DVC metrics (all variants' and
    evaluate's), the evaluation tables, the test predictions behind the confusion plots, each
    variant's training history and the registry's choice."""
    out: dict[str, object] = dict(read_metrics_files(ws))
    for folder, pattern in (("data/evaluation", "*"), ("data/plots/evaluate/confusion", "*.csv")):
        files = sorted((ws / folder).glob(pattern))
        assert files, folder
        out.update({f.relative_to(ws).as_posix(): f.read_bytes() for f in files})
    ensembles = json.loads((ws / "data/ensembles.json").read_text())
    out["data/ensembles.json"] = {
        name: {k: v for k, v in e.items() if k not in RUN_DEPENDENT["data/ensembles.json"]}
        for name, e in ensembles.items()}
    for variant in VARIANTS:
        history = ws / f"data/plots/{variant}/history.csv"
        assert history.read_text().count("\n") > 1, variant
        out[history.relative_to(ws).as_posix()] = history.read_bytes()
    registry = json.loads((ws / "data/registry.json").read_text())
    out["data/registry.json"] = {k: v for k, v in registry.items() if k not in RUN_DEPENDENT["data/registry.json"]}
    return out


def check_same_outputs(before: dict[str, object], after: dict[str, object]) -> None:
    assert sorted(after) == sorted(before)
    changed = [name for name in before if after[name] != before[name]]
    assert changed == [], {name: (before[name], after[name]) for name in changed}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One whole `dvc repro` of the default variants, tiny; the two tests below share it (a run
    is most of their cost): the determinism test re-runs it as it was, the variants test leaves
    it with the variants it found."""
    # scratch: lr 0.01 for 20 epochs, so 50 training images teach tinyvgg something (at the default
    # 0.001 for 2 epochs it stays near chance); regularized keeps its own 100 epochs.
    ws = _workspace(tmp_path_factory.mktemp("full"), **TINY,
                    scratch={"epochs": 20, "lr": 0.01, "arch": "tinyvgg", "arch_kwargs": {"hidden_units": 4}},
                    feature_extract={"image_size": 32}, fine_tune={"epochs": 1})
    return ws, _dvc(ws, "repro")


def test_full_repro_trains_both_variants_into_mlflow_deterministically(full_run):
    import mlflow

    ws, result = full_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shown = _dvc(ws, "metrics", "show", "--json")
    files = next(iter(json.loads(shown.stdout).values()))["data"]
    before = read_outputs(ws)
    assert set(METRICS_FILES) <= set(files)
    runs = {}
    for variant in VARIANTS:
        run = json.loads((ws / f"data/models/{variant}/run.json").read_text())
        runs[variant] = run["run_id"]
        assert (ws / f"data/plots/{variant}/curves.png").exists()
    client = mlflow.MlflowClient(f"sqlite:///{ws}/mlflow.db")
    for variant, run_id in runs.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["variant"] == variant
        assert run.info.run_name == variant
        if variant in ("scratch", "regularized"):
            expected = yaml.safe_load((ws / "params.yaml").read_text())["variants"]["scratch"][variant]["dropout"]
            assert run.data.params["dropout"] == str(expected)
        # One naming scheme for every kind, so MLflow's compare view lines the runs up.
        assert {"kind", "arch", "image_size", "epochs", "batch_size", "lr", "dropout", "precision",
                "device"} <= set(run.data.params), (variant, sorted(run.data.params))
        assert {"train_loss", "val_loss", "train_accuracy", "val_accuracy"} <= set(run.data.metrics)

    # evaluate: every variant and the ensemble on the test split, pairwise McNemar tests.
    evaluated = json.loads((ws / "data/metrics/evaluate.json").read_text())
    check_test_beats_chance(evaluated)
    check_beats_chance(ws)
    assert set(VARIANTS) | {"ensemble", "mcnemar"} <= set(evaluated)
    for variant in VARIANTS:
        test = evaluated[variant]
        assert test["test_accuracy_ci_low"] <= test["test_accuracy"] <= test["test_accuracy_ci_high"]
        assert client.get_run(runs[variant]).data.metrics["test_accuracy"] == pytest.approx(test["test_accuracy"])
    table = (ws / "data/evaluation/comparison.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in table[1:]] == [*VARIANTS, "ensemble"]
    check_champion(ws, client, runs, evaluated)  # register: one version per variant, the alias

    # Determinism: every stage run again writes every output above again, byte for byte (less
    # RUN_DEPENDENT's fields).
    again = _dvc(ws, "repro", "--force")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert [s for s in STAGES if f"Running stage '{s}'" not in again.stdout] == [], again.stdout[-3000:]
    check_same_outputs(before, read_outputs(ws))


def _set_variant(ws: Path, kind: str, name: str, entry: dict | None) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    if entry is None:
        del params["variants"][kind][name]
    else:
        params["variants"][kind][name] = entry
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_adding_a_variant_trains_only_it_and_removing_it_drops_it_everywhere(full_run):
    """The lenet entry of the README: added, only its stage, evaluate and register run, and it is in
    every output and in MLflow; removed, it is in none of the outputs again."""
    import mlflow

    ws, first = full_run
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    status = _dvc(ws, "status")
    assert "Data and pipelines are up to date." in status.stdout + status.stderr  # what it starts from
    before = read_metrics_files(ws)

    _set_variant(ws, "scratch", "lenet", {"arch": "lenet5", "epochs": 2})
    added = _dvc(ws, "repro")
    assert added.returncode == 0, added.stdout[-3000:] + added.stderr[-3000:]
    ran = sorted(line.split("'")[1] for line in added.stdout.splitlines() if line.startswith("Running stage"))
    assert ran == ["evaluate", "register", "scratch@lenet"], added.stdout[-3000:]
    evaluated = json.loads((ws / "data/metrics/evaluate.json").read_text())
    assert "lenet" in evaluated
    assert {"lenet_vs_fine_tune", "scratch_vs_lenet"} <= set(evaluated["mcnemar"])
    table = (ws / "data/evaluation/comparison.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in table[1:]] == ["scratch", "regularized", "lenet", "feature_extract",
                                                        "fine_tune", "ensemble"]
    assert "lenet" in (ws / "data/evaluation/mcnemar.csv").read_text()
    assert "lenet" in json.loads((ws / "data/registry.json").read_text())["versions"]
    client = mlflow.MlflowClient(f"sqlite:///{ws}/mlflow.db")
    run = client.get_run(json.loads((ws / "data/models/lenet/run.json").read_text())["run_id"])
    assert run.info.run_name == "lenet" and run.info.status == "FINISHED"
    assert (run.data.params["kind"], run.data.params["arch"], run.data.params["epochs"]) == ("scratch", "lenet5", "2")
    assert client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                       filter_string=f"source_run_id = '{run.info.run_id}'")
    # The other variants' results are untouched (their stages were not re-run).
    after = read_metrics_files(ws, METRICS_FILES + ("data/metrics/lenet.json",))
    assert [f for f in METRICS_FILES if f != "data/metrics/evaluate.json" and after[f] != before[f]] == []

    _set_variant(ws, "scratch", "lenet", None)
    removed = _dvc(ws, "repro")
    assert removed.returncode == 0, removed.stdout[-3000:] + removed.stderr[-3000:]
    ran = sorted(line.split("'")[1] for line in removed.stdout.splitlines() if line.startswith("Running stage"))
    assert ran == ["evaluate", "register"], removed.stdout[-3000:]
    evaluated = json.loads((ws / "data/metrics/evaluate.json").read_text())
    assert "lenet" not in evaluated and not any("lenet" in pair for pair in evaluated["mcnemar"])
    for table in ("comparison.csv", "mcnemar.csv", "per_class.csv", "comparison.md"):
        assert "lenet" not in (ws / "data/evaluation" / table).read_text(), table
    assert "lenet" not in json.loads((ws / "data/registry.json").read_text())["versions"]
    assert not (ws / "data/plots/evaluate/confusion/lenet.csv").exists()
    # Back to the first run's variants: evaluate writes the first run's metrics again.
    assert (ws / "data/metrics/evaluate.json").read_bytes() == before["data/metrics/evaluate.json"]


@pytest.mark.parametrize("kind, entry, message", [
    ("scratch", {"archh": "lenet5"}, "variants.scratch.lenet.archh: unknown key"),
    ("fine_tune", {"from": "scratch"}, "variants.fine_tune.lenet.from = 'scratch': not a feature_extract variant"),
])
def test_a_bad_variant_stops_the_pipeline_before_any_work(tmp_path: Path, kind: str, entry: dict, message: str):
    ws = _workspace(tmp_path)
    _set_variant(ws, kind, "lenet", entry)
    result = _dvc(ws, "repro")
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (ws / "data/raw").exists()  # the first stage stopped before it wrote anything
