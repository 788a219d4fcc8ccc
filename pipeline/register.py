"""Stage `register`: every declared variant becomes a version of one registered model; the alias
(`champion`) goes to the best validation accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from _common import parse, run

from cnnlab.files import write_json
from cnnlab.registry import RegistryError, read_candidate, register_variants
from cnnlab.tracking import tracking_uri


def main() -> None:
    args, params = parse(__doc__, "models", "test_metrics", "out")
    models, evaluate_file = Path(args.models), Path(args.test_metrics)
    test = json.loads(evaluate_file.read_text()) if evaluate_file.exists() else None
    candidates = [read_candidate(name, models / name, test, v.stage)
                  for name, v in params.resolved_variants().items()]
    mlflow.set_tracking_uri(tracking_uri())
    result = register_variants(mlflow.MlflowClient(), params.registry.model_name, params.registry.alias,
                               candidates)
    write_json(Path(args.out), {
        "model_name": result.model_name,
        "alias": result.alias,
        "champion": result.champion,
        "champion_version": result.champion_version,
        "chosen_by": "val_accuracy",
        "versions": result.versions,
        "model_uri": f"models:/{result.model_name}@{result.alias}",
    })
    for c in candidates:
        mark = "  <- " + result.alias if c.variant == result.champion else ""
        test_acc = "   n/a" if c.test_accuracy is None else f"{c.test_accuracy:.4f}"
        print(f"  v{result.versions[c.variant]:>3}  {c.variant:<16} val {c.val_accuracy:.4f}  test {test_acc}{mark}")
    if result.created:
        print(f"new versions for: {', '.join(result.created)}")
    if result.moved:
        was = f" (was version {result.previous_version})" if result.previous_version else ""
        print(f"alias {result.alias!r} -> version {result.champion_version} ({result.champion}){was}")
    else:
        print(f"alias {result.alias!r} unchanged: version {result.champion_version} ({result.champion})")
    print(f'serve it: mlflow models serve -m "models:/{result.model_name}@{result.alias}" --env-manager local -p 5001')


if __name__ == "__main__":
    run(main, RegistryError, FileNotFoundError)
