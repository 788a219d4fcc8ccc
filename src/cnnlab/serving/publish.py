"""Each variant's servable pyfunc, logged into the variant's own MLflow run by `register` (an
ensemble's into the run `evaluate` made for it).

The training stages log the trained model's files (``classifier/``), not the pyfunc: what serves
them (this package) is then not a dependency of training, and editing it re-runs `register` only.
`register` runs whenever its dependencies change, so a logged pyfunc is reused while nothing that
goes into it has changed: the model's files, the serving limits and temperature, and the code
shipped with it (the cnnlab package). Its tag ``cnnlab.served`` holds the digest of all of them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlflow

import cnnlab
from cnnlab.data.shards import iter_images
from cnnlab.serving.ensemble import log_ensemble
from cnnlab.serving.pyfunc import log_classifier
from cnnlab.tracking.runs import tracked_run
from cnnlab.utils.files import file_digest

SERVED_TAG = "cnnlab.served"


def serving_limits(split_dir: Path) -> dict[str, int | None]:
    """The split's decode limits, which the served model repeats on raw uploads (see pyfunc.py)."""
    meta = split_dir / "preprocess.json"
    if not meta.exists():  # a split written before this file existed: re-run `split` to get it
        return {}
    settings = json.loads(meta.read_text())
    return {"max_pixels": settings["max_image_pixels"], "max_side": settings["max_side"]}


def example_images(split_dir: Path, count: int = 2) -> list[bytes]:
    """The input example logged with the model: the first validation images."""
    return list(iter_images(split_dir, "val", limit=count))


def served_digest(model_dir: Path | Sequence[Path], limits: dict[str, Any]) -> str:
    """What a logged pyfunc is made of: the model's files (an ensemble's: each member's), its
    settings (limits, temperature, prediction sets, test-time views) and the package's code."""
    h = hashlib.sha256()
    for folder in [model_dir] if isinstance(model_dir, Path) else model_dir:
        for name in ("spec.json", "weights.pt"):
            h.update(f"{folder.name}/{name}:{file_digest(folder / name)}\n".encode())
    h.update(json.dumps(limits, sort_keys=True).encode())
    package = Path(cnnlab.__file__).parent
    for source in sorted(package.rglob("*.py")):
        h.update(f"{source.relative_to(package).as_posix()}:{file_digest(source)}\n".encode())
    return h.hexdigest()


def publish(run_id: str, model_dir: Path, *, limits: dict[str, Any], examples: Sequence[bytes]) -> str:
    """The URI (``models:/m-...``) of ``model_dir``'s pyfunc in run ``run_id``: the one already
    logged there from the same files, settings (`log_classifier`'s keywords: max_pixels, max_side,
    temperature, conformal_threshold, coverage, tta) and code, else a new one logged now."""
    return _logged_or_log(run_id, served_digest(model_dir, limits),
                          lambda tags: log_classifier(model_dir, example_images=examples, tags=tags, **limits))


def publish_ensemble(run_id: str, members: dict[str, Path], member_settings: dict[str, dict[str, Any]], *,
                     limits: dict[str, Any], examples: Sequence[bytes]) -> str:
    """As `publish`, for an ensemble of the classifier folders ``members`` (name -> folder) in the
    run evaluate made for it (`cnnlab.serving.ensemble.log_ensemble` takes the settings)."""
    digest = served_digest(list(members.values()), {**limits, "members": member_settings})
    return _logged_or_log(run_id, digest, lambda tags: log_ensemble(
        members, member_settings, example_images=examples, tags=tags, **limits))


def _logged_or_log(run_id: str, digest: str, log: Callable[[dict[str, str]], Any]) -> str:
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    for logged in client.search_logged_models([run.info.experiment_id],
                                              filter_string=f"tags.`{SERVED_TAG}` = '{digest}'"):
        if logged.source_run_id == run_id:
            return f"models:/{logged.model_id}"
    with tracked_run(experiment=run.info.experiment_id, run_name=run.info.run_name, tags={}, params=None,
                     run_id=run_id):
        info = log({SERVED_TAG: digest})
    return info.model_uri
