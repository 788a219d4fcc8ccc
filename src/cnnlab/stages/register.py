"""Stage `register`: every declared variant becomes a version of one registered model, and the
alias (`champion`) goes to the best validation accuracy (`cnnlab.tracking.model_registry` does the MLflow part).
An ensemble is registered like the others: one version, in the run `evaluate` made for it, whose
pyfunc runs its members' networks in one process (`cnnlab.serving.ensemble`).

Inside a DVC experiment (`dvc exp run`, queued or not) the versions are registered and tagged with
the experiment's name, but the alias stays where it is: a sweep's experiments finish in any order,
and the last one would otherwise decide what `models:/...@champion` serves. Promote one with
`dvc exp apply <name>` then `dvc repro -f -s register`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path

import mlflow

from cnnlab.config import EnsembleParams, RegistryParams, ServingParams
from cnnlab.serving.publish import (
    Exports,
    example_images,
    publish,
    publish_ensemble,
    serving_limits,
)
from cnnlab.tracking.model_registry import (
    Candidate,
    RegistryError,
    RegistryResult,
    read_candidate,
    register_variants,
    require_run,
)
from cnnlab.tracking.runs import dvc_experiment_tags, end_stale_runs, tracking_uri
from cnnlab.utils.files import write_json

_log = logging.getLogger(__name__)


def register(models_dir: Path, split_dir: Path, test_metrics: Path, out: Path, *, stages: dict[str, str],
             cfg: RegistryParams, coverage: float, tta: list[str], ensembles: dict[str, EnsembleParams] | None = None,
             ensembles_file: Path | None = None, serving: ServingParams | None = None) -> str:
    """Publish and register ``models_dir/<variant>`` for each variant in ``stages`` (variant -> the
    DVC stage that trains it, for error messages), in that order (a tie goes to the first); write
    the summary to ``out``; return it as text, with the command that serves the champion.
    ``split_dir`` gives the served model its decode limits and input example, ``test_metrics``
    (evaluate's) each variant's test accuracy, temperature, conformal threshold (fitted for
    ``coverage``, evaluate's param) and whether its test-time views (``tta``, evaluate's) are used.
    Then each of ``ensembles`` (name -> settings, members listed), from the run and validation
    accuracy evaluate recorded in ``ensembles_file``; a tie goes to the trained variant. Each is
    served on ``serving.runtime``: for ONNX, its graph is checked on ``split_dir``'s test images."""
    mlflow.set_tracking_uri(tracking_uri())
    serving = serving or ServingParams()
    candidates = published(models_dir, split_dir, test_metrics, stages=stages, coverage=coverage, tta=tta,
                           ensembles=ensembles or {}, ensembles_file=ensembles_file, serving=serving)
    client = mlflow.MlflowClient()
    tags = dvc_experiment_tags()
    experiment = tags.get("dvc.exp_name")
    result = register_variants(client, cfg.model_name, cfg.alias, candidates,
                               promote=experiment is None, tags=tags)
    write_json(out, {
        "model_name": result.model_name,
        "alias": result.alias if result.promoted else None,
        **({"dvc_experiment": experiment} if experiment else {}),
        "champion": result.champion,
        "champion_version": result.champion_version,
        "chosen_by": "val_accuracy",
        "runtime": serving.runtime,
        "versions": result.versions,
        "model_uri": _model_uri(result),
    })
    return _summary(result, candidates, experiment)


def published(models_dir: Path, split_dir: Path, test_metrics: Path, *, stages: dict[str, str], coverage: float,
              tta: list[str], ensembles: dict[str, EnsembleParams], ensembles_file: Path | None,
              serving: ServingParams) -> list[Candidate]:
    """Each variant (``stages``, then ``ensembles``) as a candidate whose ``model_uri`` is its pyfunc
    on ``serving.runtime``, logged into its run now or found there (`cnnlab.serving.publish`):
    `register`'s first half, which bench/serving_load.py also uses to serve both runtimes."""
    test = json.loads(test_metrics.read_text()) if test_metrics.exists() else None
    ensembles = dict(ensembles or {})
    candidates = [read_candidate(name, models_dir / name, test, stage) for name, stage in stages.items()]
    candidates += _ensemble_candidates(ensembles, ensembles_file, test)
    stages = {**stages, **{name: "evaluate" for name in ensembles}}
    # Before a version points at them: end the runs that a killed stage left RUNNING in the variants'
    # experiments (cnnlab.utils.run_guard; the watcher covers a SIGKILL, this a power cut).
    end_stale_runs(sorted({e for c in candidates if (e := _experiment_of(mlflow.MlflowClient(), c.run_id))}))
    limits, examples = serving_limits(split_dir), example_images(split_dir)
    with tempfile.TemporaryDirectory(prefix="cnnlab-onnx-") as tmp:
        exports = Exports(Path(tmp), split_dir, serving.parity_images) if serving.runtime == "onnx" else None
        return [dataclasses.replace(c, model_uri=_publish_ensemble(c, ensembles[c.variant], models_dir, test,
                                                                   limits, coverage, tta, examples, exports)
                                    if c.variant in ensembles else
                                    _publish(c, models_dir, stages, {**limits, **_trust(test, c.variant, coverage, tta)},
                                             examples, exports))
                for c in candidates]


def _publish(c: Candidate, models_dir: Path, stages: dict[str, str], limits: dict, examples: list[bytes],
             exports: Exports | None) -> str:
    require_run(mlflow.MlflowClient(), c, stages[c.variant])
    return publish(c.run_id, models_dir / c.variant, limits=limits, examples=examples, exports=exports)


def _ensemble_candidates(ensembles: dict[str, EnsembleParams], ensembles_file: Path | None,
                         test: dict | None) -> list[Candidate]:
    if not ensembles:
        return []
    try:
        records = json.loads(ensembles_file.read_text()) if ensembles_file else {}
    except FileNotFoundError:
        records = {}
    out = []
    for name, settings in ensembles.items():
        rec = records.get(name)
        if rec is None or rec.get("members") != list(settings.members) or rec.get("combine") != settings.combine:
            raise RegistryError(f"{ensembles_file}: no evaluation of ensemble {name!r} with members "
                                f"{', '.join(settings.members)} ({settings.combine}); run `dvc repro evaluate`")
        test_accuracy = (test or {}).get(name, {}).get("test_accuracy")
        out.append(Candidate(variant=name, run_id=rec["run_id"], val_accuracy=float(rec["val_accuracy"]),
                             test_accuracy=None if test_accuracy is None else float(test_accuracy)))
    return out


def _publish_ensemble(c: Candidate, settings: EnsembleParams, models_dir: Path, test: dict | None, limits: dict,
                      coverage: float, tta: list[str], examples: list[bytes], exports: Exports | None) -> str:
    """The ensemble's pyfunc: each member served as evaluate averaged it (its temperature where the
    ensemble averages calibrated probabilities, its views where they won), then the ensemble's own
    temperature and threshold."""
    require_run(mlflow.MlflowClient(), c, "evaluate")
    members = {}
    for m in settings.members:
        trust = _trust(test, m, coverage, tta)
        members[m] = {"temperature": trust["temperature"] if settings.combine == "calibrated_mean" else 1.0,
                      "tta": trust["tta"]}
    own = {k: v for k, v in _trust(test, c.variant, coverage, tta).items() if k != "tta"}
    return publish_ensemble(c.run_id, {m: models_dir / m for m in settings.members}, members,
                            limits={**limits, **own}, examples=examples, exports=exports)


def _trust(test_metrics: dict | None, variant: str, coverage: float, tta: list[str]) -> dict:
    """What evaluate fitted on validation for ``variant`` (its metrics file) and the served model
    applies: the temperature, the prediction sets' threshold, and the test-time views ``tta``
    where evaluate chose them. Without them (evaluate has not recorded any) the model is served as
    trained and every set holds every class."""
    metrics = (test_metrics or {}).get(variant, {})
    if "temperature" not in metrics or "conformal_threshold" not in metrics:
        _log.warning("%s: no temperature or conformal threshold in the evaluate metrics; its served "
                     "probabilities are not calibrated and its prediction sets hold every class (run "
                     "`dvc repro evaluate` first)", variant)
        return {"temperature": 1.0, "conformal_threshold": 1.0, "coverage": None, "tta": []}
    return {"temperature": float(metrics["temperature"]),
            "conformal_threshold": float(metrics["conformal_threshold"]), "coverage": coverage,
            "tta": list(tta) if metrics.get("tta_used") else []}


def _experiment_of(client: mlflow.MlflowClient, run_id: str) -> str | None:
    try:
        return client.get_run(run_id).info.experiment_id
    except mlflow.exceptions.MlflowException:  # register_variants says what is missing
        return None


def _model_uri(result: RegistryResult) -> str:
    if result.promoted:
        return f"models:/{result.model_name}@{result.alias}"
    return f"models:/{result.model_name}/{result.champion_version}"


def _summary(result: RegistryResult, candidates: list, experiment: str | None) -> str:
    lines = []
    for c in candidates:
        mark = ("  <- " + result.alias if result.promoted else "  <- best") if c.variant == result.champion else ""
        test_acc = "   n/a" if c.test_accuracy is None else f"{c.test_accuracy:.4f}"
        lines.append(f"  v{result.versions[c.variant]:>3}  {c.variant:<16} val {c.val_accuracy:.4f}  "
                     f"test {test_acc}{mark}")
    if result.created:
        lines.append(f"new versions for: {', '.join(result.created)}")
    if not result.promoted:
        lines.append(f"alias {result.alias!r} not moved: this is DVC experiment {experiment!r}; to promote "
                     f"its champion ({result.champion}, version {result.champion_version}): "
                     f"dvc exp apply {experiment} && dvc repro -f -s register")
    elif result.moved:
        was = f" (was version {result.previous_version})" if result.previous_version else ""
        lines.append(f"alias {result.alias!r} -> version {result.champion_version} ({result.champion}){was}")
    else:
        lines.append(f"alias {result.alias!r} unchanged: version {result.champion_version} ({result.champion})")
    lines.append(f'serve it: mlflow models serve -m "{_model_uri(result)}" --env-manager local -p 5001 -w 2')
    return "\n".join(lines) + "\n"
