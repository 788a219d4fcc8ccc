"""Each variant's servable pyfunc, logged into the variant's own MLflow run by `register` (an
ensemble's into the run `evaluate` made for it), on the runtime ``serving.runtime`` names: ONNX
Runtime (the network exported and checked against PyTorch on test images, `Exports`) or PyTorch.

The training stages log the trained model's files (``classifier/``), not the pyfunc: what serves
them (this package) is then not a dependency of training, and editing it re-runs `register` only.
`register` runs whenever its dependencies change, so a logged pyfunc is reused while nothing that
goes into it has changed: the model's files, the serving limits and temperature, the runtime, and
the code shipped with it (the cnnlab package). Its tag ``cnnlab.served`` holds the digest of all of
them; ``cnnlab.onnx_parity`` says what the ONNX graph was checked on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

import cnnlab
from cnnlab.data.shards import iter_images
from cnnlab.data.tensors import load_split
from cnnlab.models.classifier import load_classifier
from cnnlab.serving.ensemble import log_ensemble
from cnnlab.serving.onnx_export import check_parity, onnx_folder
from cnnlab.serving.onnx_pyfunc import log_onnx_model
from cnnlab.serving.pyfunc import log_classifier
from cnnlab.tracking.runs import tracked_run
from cnnlab.utils.files import file_digest

SERVED_TAG = "cnnlab.served"
PARITY_TAG = "cnnlab.onnx_parity"
_log = logging.getLogger(__name__)


class Exports:
    """Each classifier folder exported to ONNX under ``root`` and checked once per register run
    (an ensemble reuses its members' graphs): on ``parity_images`` test images of ``split_dir``,
    evenly spaced over the split (None: all), its probabilities must equal PyTorch's
    (`cnnlab.serving.onnx_export.check_parity`, which stops the stage where they do not)."""

    def __init__(self, root: Path, split_dir: Path, parity_images: int | None) -> None:
        self._root, self._split_dir, self._count = root, split_dir, parity_images
        self._done: dict[Path, tuple[Path, str]] = {}

    def __call__(self, model_dir: Path) -> tuple[Path, str]:
        """(the ONNX folder, what it was checked on) for the classifier folder ``model_dir``."""
        if model_dir not in self._done:
            model, spec = load_classifier(model_dir)
            folder = onnx_folder(model, spec, model_dir, self._root / f"{len(self._done)}-{model_dir.name}")
            images = load_split(self._split_dir, "test", mode=spec.mode, size=spec.image_size).images.numpy()
            if self._count is not None and self._count < len(images):
                images = images[np.unique(np.linspace(0, len(images) - 1, self._count).round().astype(int))]
            parity = check_parity(model, folder / "model.onnx", _batches(images), name=model_dir.name)
            said = f"{parity.images} test images, max |p_onnx - p_torch| {parity.max_abs_diff:.2g}"
            print(f"{model_dir.name}: ONNX graph checked against PyTorch on {said}", flush=True)
            self._done[model_dir] = (folder, said)
        return self._done[model_dir]


def _batches(images: np.ndarray, size: int = 32) -> Iterator[np.ndarray]:
    # 32: eager PyTorch on a CPU is fastest per image around there, 2x slower at 256.
    return (images[s:s + size] for s in range(0, len(images), size))


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


def publish(run_id: str, model_dir: Path, *, limits: dict[str, Any], examples: Sequence[bytes],
            exports: Exports | None) -> str:
    """The URI (``models:/m-...``) of ``model_dir``'s pyfunc in run ``run_id``: the one already
    logged there from the same files, settings (`log_classifier`'s keywords: max_pixels, max_side,
    temperature, conformal_threshold, coverage, tta), runtime and code, else a new one logged now:
    on ONNX Runtime from the graph ``exports`` makes, or on PyTorch where ``exports`` is None."""
    digest = served_digest(model_dir, {**limits, "runtime": "torch" if exports is None else "onnx"})
    if exports is None:
        return _logged_or_log(run_id, digest,
                              lambda tags: log_classifier(model_dir, example_images=examples, tags=tags, **limits))

    def log(tags: dict[str, str]) -> Any:
        folder, checked = exports(model_dir)
        return log_onnx_model({None: (folder, model_dir)}, example_images=examples, tags={**tags, PARITY_TAG: checked},
                              **limits)

    return _logged_or_log(run_id, digest, log)


def publish_ensemble(run_id: str, members: dict[str, Path], member_settings: dict[str, dict[str, Any]], *,
                     limits: dict[str, Any], examples: Sequence[bytes], exports: Exports | None) -> str:
    """As `publish`, for an ensemble of the classifier folders ``members`` (name -> folder) in the
    run evaluate made for it (`cnnlab.serving.ensemble.log_ensemble` takes the settings)."""
    digest = served_digest(list(members.values()), {**limits, "members": member_settings,
                                                    "runtime": "torch" if exports is None else "onnx"})
    if exports is None:
        return _logged_or_log(run_id, digest, lambda tags: log_ensemble(
            members, member_settings, example_images=examples, tags=tags, **limits))

    def log(tags: dict[str, str]) -> Any:
        graphs = {m: exports(folder) for m, folder in members.items()}
        checked = "; ".join(f"{m}: {said}" for m, (_, said) in graphs.items())
        return log_onnx_model({m: (graphs[m][0], members[m]) for m in members}, members=member_settings,
                              example_images=examples, tags={**tags, PARITY_TAG: checked}, **limits)

    return _logged_or_log(run_id, digest, log)


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
