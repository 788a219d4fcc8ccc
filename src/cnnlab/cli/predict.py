"""`python -m cnnlab predict`: classify image files with a logged pyfunc, locally (no server, the
same model `mlflow models serve` would load), as a table or JSON Lines."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnlab.data.images import IMAGE_EXTENSIONS

DEFAULT_MODEL_URI = "models:/cnnlab-classifier@champion"
PARAMS_FILE = Path("params.yaml")
TOP_K = 3


class CliError(Exception):
    """A problem the user fixes (model, params, arguments): printed as one message, exit 2."""


@dataclass(frozen=True)
class Outcome:
    """One file's result: ``prediction`` (label, label_id, confidence, probabilities) or ``error``."""

    path: Path
    prediction: dict[str, Any] | None = None
    error: str | None = None


def default_model_uri(params_file: Path = PARAMS_FILE) -> str:
    """The registry entry the register stage maintains, as named in ``params_file`` if present."""
    if not params_file.is_file():
        return DEFAULT_MODEL_URI
    from cnnlab.config import ConfigError, load_params

    try:
        registry = load_params(params_file).registry
    except ConfigError as e:
        raise CliError(f"{e}\n(fix it, or pass --model URI)") from None
    return f"models:/{registry.model_name}@{registry.alias}"

def find_images(paths: Sequence[Path]) -> tuple[list[Path], list[Outcome]]:
    """Files to classify (named files as given, folders' images sorted) and errors for the rest.

    A named file is used whatever its extension (the model decides whether it is an image); in
    folders only IMAGE_EXTENSIONS count. A missing path or a folder without images is an error.
    """
    files: list[Path] = []
    errors: list[Outcome] = []
    seen: set[Path] = set()
    for path in paths:
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
            if not found:
                errors.append(Outcome(path, error="folder holds no image files"))
        elif path.exists():
            found = [path]
        else:
            errors.append(Outcome(path, error="no such file or folder"))
            found = []
        for p in found:
            if p.resolve() not in seen:
                seen.add(p.resolve())
                files.append(p)
    return files, errors

def load_model(uri: str) -> Any:
    """Load the pyfunc at ``uri`` from the project's tracking store, or raise `CliError` saying why."""
    # Imported here: `--help` and argument errors should not wait for MLflow and torch.
    import mlflow
    from mlflow.exceptions import MlflowException

    from cnnlab.tracking.runs import tracking_uri

    store = tracking_uri()
    mlflow.set_tracking_uri(store)
    if uri.startswith(("models:/", "runs:/")) and store.startswith("sqlite:///"):
        # MLflow would create an empty database here and then report the model missing.
        db = Path(store.removeprefix("sqlite:///"))
        if not db.is_file():
            raise CliError(
                f"cannot load {uri}: no tracking store at {db} (from {store}). Run from the "
                "repository root after `dvc repro`, set MLFLOW_TRACKING_URI, or pass --model "
                "with a local model folder."
            )
    try:
        return mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as e:
        reason = e.message if isinstance(e, MlflowException) else str(e)
        raise CliError(
            f"cannot load {uri} from {store}: {_first_line(reason)}\nTrain and register the "
            "model with `dvc repro` (from the repository root), or pass --model with an existing "
            "models:/, runs:/ or local folder URI."
        ) from None

def predict_files(model: Any, files: Sequence[Path], *, batch_size: int = 64) -> Iterator[Outcome]:
    """Classify ``files`` in batches with a loaded pyfunc; yields one `Outcome` per file, in order."""
    for start in range(0, len(files), batch_size):
        items: list[tuple[Path, bytes]] = []
        unreadable: dict[Path, Outcome] = {}
        for path in files[start : start + batch_size]:
            try:
                items.append((path, path.read_bytes()))
            except OSError as e:
                unreadable[path] = Outcome(path, error=f"cannot read: {e.strerror or e}")
        done = {o.path: o for o in _predict_items(model, items)} | unreadable
        for path in files[start : start + batch_size]:
            yield done[path]

def explain_files(model: Any, outcomes: Sequence[Outcome], out_dir: Path) -> list[Path]:
    """For each classified file, ``out_dir/<name>.gradcam.png`` (``<folder>_<name>`` when two
    files share a name): the image as the model reads it beside a Grad-CAM map of the predicted
    class (`cnnlab.evaluation.explain`); for an ensemble one per member,
    ``<name>.gradcam.<member>.png``. Needs a cnnlab pyfunc, on either runtime (an ONNX model ships
    its PyTorch networks for this); returns the files written."""
    from cnnlab.evaluation.explain import grad_cam, save_overlay
    from cnnlab.serving.protocol import ServedImageModel

    inner = model.unwrap_python_model() if hasattr(model, "unwrap_python_model") else None
    if not isinstance(inner, ServedImageModel) or not hasattr(inner, "networks"):
        raise CliError("--explain needs a cnnlab model (its PyTorch network); this one is not")
    written: list[Path] = []
    for o in outcomes:
        if o.prediction is None:
            continue
        label = int(o.prediction["label_id"])
        for member, network, spec in inner.networks():
            tensor = inner.prepare_upload(o.path.read_bytes(), spec)
            heat = grad_cam(network, tensor[None], [label])[0]
            suffix = f".gradcam.{member}.png" if member else ".gradcam.png"
            target = out_dir / f"{o.path.name}{suffix}"
            if target in written:  # the same file name from another folder: keep both
                target = out_dir / f"{o.path.parent.name}_{o.path.name}{suffix}"
            while target in written:
                target = target.with_name(f"{len(written)}_{target.name}")
            by = f", Grad-CAM of {member}" if member else ""
            save_overlay(tensor.numpy(), heat, target,
                         title=f"{o.path.name}: {o.prediction['label']} ({o.prediction['confidence']:.2f}){by}")
            written.append(target)
    return written

def _predict_items(model: Any, items: list[tuple[Path, bytes]]) -> list[Outcome]:
    import pandas as pd
    from mlflow.exceptions import MlflowException

    if not items:
        return []
    try:
        frame = model.predict(pd.DataFrame({"image": [data for _, data in items]}, dtype=object))
    except MlflowException as e:
        if len(items) == 1:
            return [Outcome(items[0][0], error=_reason(e))]
        # One bad image fails its whole batch; one at a time tells which (bad files are rare).
        return [outcome for item in items for outcome in _predict_items(model, [item])]
    return [Outcome(path, prediction=row) for (path, _), row in zip(items, frame.to_dict("records"))]

def _reason(e: Exception) -> str:
    # cnnlab.serving.ServingError carries the reason alone; other errors get "row N: " cut.
    reason = getattr(e, "reason", None) or getattr(e, "message", None) or str(e)
    return re.sub(r"^row \d+: ", "", _first_line(reason))

def format_table(outcomes: Sequence[Outcome], top_k: int = TOP_K) -> str:
    """Columns path, label, confidence, top-k classes; a failed file shows ``error: REASON``. An
    unsure answer (its prediction set holds several classes) ends with ``unsure: {a, b}``."""
    header = ("PATH", "LABEL", "CONFIDENCE", f"TOP-{top_k}")
    rows = []
    for o in outcomes:
        if o.prediction is None:
            rows.append((str(o.path), f"error: {o.error}"))
            continue
        probs = sorted(o.prediction["probabilities"].items(), key=lambda kv: -kv[1])[:top_k]
        top = ", ".join(f"{name} {p:.3f}" for name, p in probs)
        if o.prediction.get("unsure"):
            top += f"  unsure: {{{', '.join(map(str, o.prediction['prediction_set']))}}}"
        rows.append((str(o.path), str(o.prediction["label"]), f"{o.prediction['confidence']:.4f}", top))
    path_w = max(len(header[0]), *(len(r[0]) for r in rows)) if rows else len(header[0])
    label_w = max([len(header[1])] + [len(r[1]) for r in rows if len(r) == 4])
    lines = [f"{header[0]:<{path_w}}  {header[1]:<{label_w}}  {header[2]:>10}  {header[3]}"]
    for r in rows:
        if len(r) == 2:
            lines.append(f"{r[0]:<{path_w}}  {r[1]}")
        else:
            lines.append(f"{r[0]:<{path_w}}  {r[1]:<{label_w}}  {r[2]:>10}  {r[3]}")
    return "\n".join(lines)

def _as_json(o: Outcome) -> dict[str, Any]:
    if o.prediction is None:
        return {"path": str(o.path), "error": o.error}
    p = o.prediction
    return {
        "path": str(o.path),
        "label": str(p["label"]),
        "label_id": int(p["label_id"]),
        "confidence": float(p["confidence"]),
        "probabilities": {k: float(v) for k, v in p["probabilities"].items()},
        # a model registered before prediction sets has neither
        **({"prediction_set": [str(c) for c in p["prediction_set"]], "unsure": bool(p["unsure"])}
           if "prediction_set" in p else {}),
    }

def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text
