"""Stage `register`: every declared variant becomes a version of one registered model, and the
alias (`champion`) goes to the best validation accuracy (`cnnlab.registry` does the MLflow part)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

from cnnlab.files import write_json
from cnnlab.registry import RegistryResult, read_candidate, register_variants
from cnnlab.tracking import tracking_uri


def register(models_dir: Path, test_metrics: Path, out: Path, *, stages: dict[str, str], model_name: str,
             alias: str) -> str:
    """Register ``models_dir/<variant>`` for each variant in ``stages`` (variant -> the DVC stage that
    trains it, for error messages), in that order (a tie goes to the first); write the summary to
    ``out``; return it as text, with the command that serves the champion."""
    test = json.loads(test_metrics.read_text()) if test_metrics.exists() else None
    candidates = [read_candidate(name, models_dir / name, test, stage) for name, stage in stages.items()]
    mlflow.set_tracking_uri(tracking_uri())
    result = register_variants(mlflow.MlflowClient(), model_name, alias, candidates)
    write_json(out, {
        "model_name": result.model_name,
        "alias": result.alias,
        "champion": result.champion,
        "champion_version": result.champion_version,
        "chosen_by": "val_accuracy",
        "versions": result.versions,
        "model_uri": f"models:/{result.model_name}@{result.alias}",
    })
    return _summary(result, candidates)


def _summary(result: RegistryResult, candidates: list) -> str:
    lines = []
    for c in candidates:
        mark = "  <- " + result.alias if c.variant == result.champion else ""
        test_acc = "   n/a" if c.test_accuracy is None else f"{c.test_accuracy:.4f}"
        lines.append(f"  v{result.versions[c.variant]:>3}  {c.variant:<16} val {c.val_accuracy:.4f}  "
                     f"test {test_acc}{mark}")
    if result.created:
        lines.append(f"new versions for: {', '.join(result.created)}")
    if result.moved:
        was = f" (was version {result.previous_version})" if result.previous_version else ""
        lines.append(f"alias {result.alias!r} -> version {result.champion_version} ({result.champion}){was}")
    else:
        lines.append(f"alias {result.alias!r} unchanged: version {result.champion_version} ({result.champion})")
    lines.append(f'serve it: mlflow models serve -m "models:/{result.model_name}@{result.alias}" '
                 "--env-manager local -p 5001")
    return "\n".join(lines) + "\n"
