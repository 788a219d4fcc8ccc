"""The MLflow Model Registry side: one registered model, one version per variant, and an alias
(``champion``) on the variant with the best *validation* accuracy.

Test accuracy is recorded on the versions for the reader but never used to choose: choosing by
test would turn the test set into a second validation set and its numbers would stop being an
honest estimate. Registration is idempotent: a variant whose run already has a version reuses
it, so re-running the stage creates nothing new and the alias moves only when the champion
(a different variant, or a retrained one) changes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException


class RegistryError(ValueError):
    """A variant cannot be registered (missing files, or its run is not in this tracking store)."""


@dataclass(frozen=True)
class Candidate:
    """One trained variant as the registry sees it."""

    variant: str
    run_id: str
    val_accuracy: float
    test_accuracy: float | None = None
    model_uri: str = ""  # the servable pyfunc in its run: "models:/m-<id>" (`cnnlab.serving.publish`)


@dataclass(frozen=True)
class RegistryResult:
    model_name: str
    alias: str
    versions: dict[str, str]  # variant -> version number
    champion: str  # variant
    champion_version: str
    previous_version: str | None  # where the alias pointed before this run
    created: tuple[str, ...]  # variants that got a new version in this run
    promoted: bool = True  # False: the alias was left where it was (a DVC experiment)

    @property
    def moved(self) -> bool:
        return self.promoted and self.previous_version != self.champion_version


def read_candidate(variant: str, model_dir: Path, test_metrics: dict | None, stage: str = "") -> Candidate:
    """A variant from its stage's ``<model_dir>/run.json`` (its run, validation accuracy);
    ``stage`` (e.g. ``scratch@scratch``) goes into the error messages."""
    run_file = model_dir / "run.json"
    redo = f"`dvc repro {stage}`" if stage else "the variant's stage"
    try:
        run = json.loads(run_file.read_text())
        val = run["val_accuracy"]
    except FileNotFoundError as e:
        raise RegistryError(f"{e.filename}: missing; run {redo} to train variant {variant!r}") from None
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise RegistryError(f"{run_file}: unreadable or incomplete ({e}); run {redo}") from None
    test = (test_metrics or {}).get(variant, {}).get("test_accuracy")
    return Candidate(variant=variant, run_id=run["run_id"], val_accuracy=float(val), test_accuracy=None if test is None else float(test))


def choose_champion(candidates: Sequence[Candidate]) -> Candidate:
    """Best validation accuracy; a tie goes to the variant listed first (params order), so the
    choice never depends on dict order or on test results."""
    if not candidates:
        raise RegistryError("no variants to choose from (params.yaml declares none)")
    return max(candidates, key=lambda c: (c.val_accuracy, -candidates.index(c)))


def register_variants(client: MlflowClient, model_name: str, alias: str, candidates: Sequence[Candidate],
                      *, promote: bool = True, tags: dict[str, str] | None = None) -> RegistryResult:
    """Register each candidate (reusing existing versions), tag them, and point ``alias`` at the
    champion's version unless ``promote`` is False. ``tags`` go on the versions this call creates
    (e.g. the DVC experiment that trained them), not on reused ones."""
    _ensure_registered_model(client, model_name)
    versions: dict[str, str] = {}
    created: list[str] = []
    for cand in candidates:
        mv = _existing_version(client, model_name, cand)
        if mv is None:
            mv = _create_version(client, model_name, cand, tags or {})
            created.append(cand.variant)
        versions[cand.variant] = mv.version
        version_tags = {"variant": cand.variant, "val_accuracy": f"{cand.val_accuracy:.4f}"}
        if cand.test_accuracy is not None:
            version_tags["test_accuracy"] = f"{cand.test_accuracy:.4f}"
        for key, value in version_tags.items():
            if mv.tags.get(key) != value:
                client.set_model_version_tag(model_name, mv.version, key, value)

    champion = choose_champion(candidates)
    previous = _alias_version(client, model_name, alias)
    if promote:
        if previous != versions[champion.variant]:
            client.set_registered_model_alias(model_name, alias, versions[champion.variant])
        client.set_registered_model_tag(model_name, f"{alias}_chosen_by", "val_accuracy")
    return RegistryResult(model_name=model_name, alias=alias, versions=versions, champion=champion.variant,
                          champion_version=versions[champion.variant], previous_version=previous,
                          created=tuple(created), promoted=promote)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(
            name, description="Image classifier variants from the cnnlab pipeline; one version per variant.")


def _existing_version(client: MlflowClient, name: str, cand: Candidate) -> ModelVersion | None:
    model_id = cand.model_uri.removeprefix("models:/")
    for mv in client.search_model_versions(f"name='{name}' and run_id='{cand.run_id}'"):
        if mv.source == cand.model_uri or getattr(mv, "model_id", None) == model_id:
            return client.get_model_version(name, mv.version)  # search results omit tags
    return None


def require_run(client: MlflowClient, cand: Candidate, stage: str = "") -> None:
    """Raise `RegistryError` unless the candidate's run is in this tracking store."""
    try:
        client.get_run(cand.run_id)
    except MlflowException:
        raise RegistryError(
            f"variant {cand.variant!r}: run {cand.run_id} is not in the tracking store; point "
            f"MLFLOW_TRACKING_URI at the store it was trained with, or retrain it "
            f"(`dvc repro --force {stage or _stage(cand.variant)}`)") from None


def _create_version(client: MlflowClient, name: str, cand: Candidate, tags: dict[str, str]) -> ModelVersion:
    require_run(client, cand)
    model_id = cand.model_uri.removeprefix("models:/") if cand.model_uri.startswith("models:/m-") else None
    return client.create_model_version(name, source=cand.model_uri, run_id=cand.run_id,
                                       tags={**tags, "variant": cand.variant}, model_id=model_id)


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        return None


def _stage(variant: str) -> str:
    return variant if variant in ("feature_extract", "fine_tune") else f"scratch@{variant}"
