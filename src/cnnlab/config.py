"""params.yaml -> typed, validated configuration.

Every section is a frozen pydantic model with ``extra="forbid"`` and strict types, so a typo'd
key, a string where a number belongs or an out-of-range value stops the pipeline *before* any
work, with a message that names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PerClassCap = Annotated[int, Field(ge=1)] | None
# auto: resolved from the hardware's capabilities when a stage starts (cnnlab.training.hardware).
PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]
DeviceName = Literal["auto", "cpu", "cuda", "mps"]


class ConfigError(ValueError):
    """params.yaml (or an override of it) is missing, unparsable or invalid."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class BaseParams(_Section):
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42
    experiment: Annotated[str, Field(min_length=1)] = "cnnlab"


class DistributedParams(_Section):
    nproc_per_node: Annotated[int, Field(ge=1, le=1024)] = 1


class DownloadParams(_Section):
    source: Literal["fashion_mnist", "url", "local"] = "fashion_mnist"
    fashion_mnist_dir: str = "/usr/share/datasets/fashion-mnist"
    # Folder URLs tried in order; params.yaml may give one string.
    fashion_mnist_url: Annotated[list[str], Field(min_length=1)] = [
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
    ]
    url: str | None = None
    sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")] | None = None
    local_dir: str = "data/local"
    follow_outside_links: bool = False
    max_download_bytes: Annotated[int, Field(ge=1)] = 2 * 1024**3
    max_extracted_bytes: Annotated[int, Field(ge=1)] = 8 * 1024**3
    max_members: Annotated[int, Field(ge=1)] = 500_000
    max_compression_ratio: Annotated[float, Field(ge=1.0)] = 200.0
    timeout_s: Annotated[float, Field(gt=0)] = 60.0

    @field_validator("fashion_mnist_url", mode="before")
    @classmethod
    def _one_url_is_a_list_of_one(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("fashion_mnist_url")
    @classmethod
    def _urls_are_http(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not re.match(r"https?://[^\s/]", url):
                raise ValueError(f"{url!r} is not an http(s) URL; give the URL of a folder holding the four files")
        return urls

    @field_validator("local_dir")
    @classmethod
    def _no_tilde(cls, value: str) -> str:
        if value.startswith("~"):
            raise ValueError(
                f"{value!r}: DVC does not expand '~' (it would look for a folder named '~' in the repository); "
                f"write the full path, e.g. {os.path.expanduser(value)!r}"
            )
        return value

    @model_validator(mode="after")
    def _url_needs_checksum(self) -> DownloadParams:
        if self.source == "url":
            if not self.url:
                raise ValueError("source 'url' needs download.url (an archive of <class>/<image> folders)")
            if not self.sha256:
                raise ValueError(
                    "source 'url' needs download.sha256 (64 hex digits); compute it with "
                    "`sha256sum ARCHIVE` on a copy you trust"
                )
        return self


class SplitParams(_Section):
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15
    test_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.15
    max_train_per_class: PerClassCap = 200
    max_val_per_class: PerClassCap = 200
    calibration_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    max_test_per_class: PerClassCap = 500
    max_image_pixels: Annotated[int, Field(ge=1)] = 40_000_000
    max_side: Annotated[int, Field(ge=8)] | None = 512
    color_mode: Literal["auto", "rgb", "grey"] = "auto"

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> SplitParams:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} "
                "leaves too little for training; keep the sum below 0.9"
            )
        return self


class ColorJitterParams(_Section):
    brightness: Annotated[float, Field(ge=0.0)] = 0.0
    contrast: Annotated[float, Field(ge=0.0)] = 0.0
    saturation: Annotated[float, Field(ge=0.0)] = 0.0
    hue: Annotated[float, Field(ge=0.0, le=0.5)] = 0.0


class AugmentParams(_Section):
    copies: Annotated[int, Field(ge=0, le=100)] = 4
    hflip: Probability = 0.5
    vflip: Probability = 0.0
    rotation: Annotated[float, Field(ge=0.0, le=180.0)] = 10.0
    translate: Annotated[float, Field(ge=0.0, le=0.5)] = 0.1
    scale: Annotated[list[Annotated[float, Field(gt=0.0)]], Field(min_length=2, max_length=2)] = [0.9, 1.1]
    shear: Annotated[float, Field(ge=0.0, le=45.0)] = 5.0
    color_jitter: ColorJitterParams = ColorJitterParams(brightness=0.2, contrast=0.2)
    auto_augment: Literal["none", "trivial_augment_wide", "auto_augment", "rand_augment"] = "none"
    random_erasing: Probability = 0.25
    preview_images: Annotated[int, Field(ge=1, le=64)] = 8
    image_size: Literal["auto"] | Annotated[int, Field(ge=8, le=1024)] = "auto"

    @model_validator(mode="after")
    def _scale_ordered(self) -> AugmentParams:
        if self.scale[0] > self.scale[1]:
            raise ValueError(f"scale {self.scale} must be [min, max] with min <= max")
        return self


# What a variant trains on: the split's training images, or those plus the augment stage's copies.
TrainData = Literal["original", "augmented"]
Positive = Annotated[int, Field(ge=1)]
Epochs = Annotated[int, Field(ge=1, le=10_000)]
BatchSize = Annotated[int, Field(ge=1, le=65_536)]
LearningRate = Annotated[float, Field(gt=0.0, le=10.0)]
WeightDecay = Annotated[float, Field(ge=0.0, le=1.0)]
Optimizer = Literal["adam", "adamw", "sgd", "rmsprop"]
Scheduler = Literal["none", "step", "cosine", "plateau", "onecycle"]
Smoothing = Annotated[float, Field(ge=0.0, lt=1.0)]


class RuntimeParams(_Section):
    """Where and at what precision a stage computes; "auto" is resolved from the machine's
    capabilities when the stage starts (`cnnlab.training.hardware.resolve_runtime`)."""

    precision: PrecisionName = "auto"
    channels_last: bool = True
    device: DeviceName = "auto"
    tf32: bool = True


class _LoopParams(_Section):
    """The loop's settings that every kind exposes, the frozen backbone's head included."""

    epochs: Epochs = 40
    batch_size: BatchSize = 64
    optimizer: Optimizer = "adamw"
    lr: LearningRate = 0.001
    weight_decay: WeightDecay = 0.0001
    scheduler: Scheduler = "cosine"
    early_stopping_patience: Positive | None = 20
    label_smoothing: Smoothing = 0.0


class FitParams(_LoopParams):
    """Everything the training loop (`cnnlab.training.engine.fit`) reads."""

    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    step_size: Positive = 10
    gamma: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    loss: Literal["cross_entropy", "focal"] = "cross_entropy"
    focal_gamma: Annotated[float, Field(ge=0.0)] = 2.0
    class_weights: Literal["none", "balanced", "auto"] = "auto"
    grad_clip: Annotated[float, Field(gt=0.0)] | None = None
    accumulation_steps: Positive = 1
    runtime: RuntimeParams = RuntimeParams()

    @model_validator(mode="after")
    def _loss_options(self) -> FitParams:
        if self.loss == "focal" and self.label_smoothing:
            raise ValueError("label_smoothing applies to cross_entropy only; set it to 0 with loss: focal")
        return self


class ScratchParams(FitParams):
    """Kind `scratch` (stage `scratch@<name>`): a net from the model zoo trained from random init."""

    arch: Annotated[str, Field(min_length=1)] = "simple_cnn"
    arch_kwargs: dict[str, int | float | str | bool | list[int | str]] = {}
    image_size: Literal["auto"] | Annotated[int, Field(ge=8, le=1024)] = "auto"
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    train_data: TrainData = "original"
    on_the_fly: bool = False
    init: Literal["default", "kaiming"] = "default"

    @model_validator(mode="after")
    def _augmentation_source(self) -> ScratchParams:
        if self.on_the_fly and self.train_data != "augmented":
            raise ValueError("on_the_fly augmentation uses the augment stage's policy: set train_data: augmented")
        return self


class HeadParams(_LoopParams):
    """How the head on top of a frozen backbone trains (on vectors: fp32, no channels_last)."""

    epochs: Epochs = 100


class FeatureExtractParams(_Section):
    """Kind `feature_extract`: a frozen ImageNet backbone, its features cached, a head trained on them."""

    backbone: Annotated[str, Field(min_length=1)] = "efficientnet_lite0"
    train_data: TrainData = "original"
    weights: str | None = "default"
    image_size: Literal["auto"] | Annotated[int, Field(ge=16, le=1024)] = "auto"
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    head_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    head_hidden: Positive | None = None
    head: HeadParams = HeadParams()
    runtime: RuntimeParams = RuntimeParams()  # of the backbone's passes

    def head_fit_params(self) -> FitParams:
        """The engine's settings for the head: vectors in, so fp32 and no channels_last."""
        runtime = RuntimeParams(precision="fp32", channels_last=False, device=self.runtime.device,
                                tf32=self.runtime.tf32)
        return FitParams(**self.head.model_dump(), runtime=runtime)


class FineTuneParams(FitParams):
    """Kind `fine_tune`: a feature_extract variant's model with its top blocks unfrozen."""

    train_data: TrainData = "original"
    unfreeze_blocks: Annotated[int, Field(ge=1, le=100)] = 6
    block_lr_decay: Annotated[float, Field(gt=0.0, le=1.0)] = 0.7
    unfreeze_every: Annotated[int, Field(ge=0)] = 0
    train_bn: bool = False
    cache_frozen: bool = True
    epochs: Epochs = 6
    batch_size: BatchSize = 32
    lr: LearningRate = 0.0003
    early_stopping_patience: Positive | None = 5


class FineTuneVariant(FineTuneParams):
    """A fine_tune variant: its section's settings plus the feature_extract variant it starts from."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)
    from_: Annotated[str, Field(alias="from", min_length=1)]


class EvaluateParams(_Section):
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 32
    bootstrap_samples: Annotated[int, Field(ge=100, le=1_000_000)] = 2000
    confidence: Annotated[float, Field(gt=0.5, lt=1.0)] = 0.95
    misclassified: Annotated[int, Field(ge=0, le=400)] = 36
    device: DeviceName = "auto"
    coverage: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.9
    label_issues: Annotated[int, Field(ge=0, le=400)] = 36
    tta: list[Literal["hflip"]] = ["hflip"]


class EnsembleParams(_Section):
    """Kind `ensemble`: no training stage; `evaluate` combines its members' answers."""

    # "all": every variant of the other kinds, in table order; or a list of their names
    members: Any = "all"
    # calibrated_mean: the mean of the members' probabilities after their own temperatures (and
    # test-time views where they use them); mean: of their probabilities as trained
    combine: Literal["calibrated_mean", "mean"] = "calibrated_mean"

    @field_validator("members")
    @classmethod
    def _all_or_names(cls, value: Any) -> Any:
        if value == "all" or (isinstance(value, list) and all(isinstance(m, str) for m in value)):
            return value
        raise ValueError(f"members = {value!r}: 'all', or a list of variant names")


class RegistryParams(_Section):
    model_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=200)] = "cnnlab-classifier"
    alias: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$", max_length=100)] = "champion"


class ServingParams(_Section):
    """What `register` logs as each version's served model (`cnnlab.serving`)."""

    runtime: Literal["onnx", "torch"] = "onnx"
    parity_images: Annotated[int, Field(ge=1)] | None = 1000


# A variant's kind, the params.yaml section it overrides, and the DVC stage that makes it: a
# foreach stage (`<stage>@<name>`), except an ensemble's, which `evaluate` makes from its members.
KINDS: dict[str, tuple[str, str]] = {
    "scratch": ("scratch", "scratch"),
    "feature_extract": ("feature_extract", "feature_extract"),
    "fine_tune": ("fine_tune", "fine_tune"),
    "ensemble": ("ensemble", "evaluate"),
}
TRAINED_KINDS = ("scratch", "feature_extract", "fine_tune")
# A variant's name is a DVC stage key (scratch@<name>), a folder (data/models/<name>), a params.yaml key
# path (variants.scratch.<name>: no dots) and an MLflow run name.
VARIANT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
# Keys of their own in evaluate's outputs (the McNemar tests, the summary run, the label check).
RESERVED_NAMES = ("mcnemar", "evaluate", "label_issues")
# Section fields that are sections themselves: a variant overrides their keys one by one.
_NESTED = ("head", "runtime")

VariantSettings = ScratchParams | FeatureExtractParams | FineTuneVariant | EnsembleParams


@dataclass(frozen=True)
class Variant:
    """One entry of ``variants``, resolved: its kind's section with the entry's keys on top."""

    name: str
    kind: str  # scratch | feature_extract | fine_tune | ensemble
    settings: Any  # ScratchParams, FeatureExtractParams, FineTuneVariant or EnsembleParams (members listed)
    overrides: dict[str, Any]  # what the entry itself sets

    @property
    def stage(self) -> str:
        """The DVC stage that makes it, e.g. ``scratch@regularized``; ``evaluate`` for an ensemble."""
        stage = KINDS[self.kind][1]
        return stage if self.kind not in TRAINED_KINDS else f"{stage}@{self.name}"


class VariantsParams(_Section):
    """``variants``: one map per kind, variant name -> the keys it changes in that kind's section."""

    scratch: dict[str, dict[str, Any] | None] = {
        "scratch": {"dropout": 0.0, "train_data": "original"},
        "regularized": {"dropout": 0.3, "train_data": "augmented", "epochs": 100},
    }
    feature_extract: dict[str, dict[str, Any] | None] = {"feature_extract": {}}
    fine_tune: dict[str, dict[str, Any] | None] = {"fine_tune": {"from": "feature_extract"}}
    ensemble: dict[str, dict[str, Any] | None] = {"ensemble": {}}


class Params(_Section):
    base: BaseParams = BaseParams()
    distributed: DistributedParams = DistributedParams()
    download: DownloadParams = DownloadParams()
    split: SplitParams = SplitParams()
    augment: AugmentParams = AugmentParams()
    scratch: ScratchParams = ScratchParams()
    feature_extract: FeatureExtractParams = FeatureExtractParams()
    fine_tune: FineTuneParams = FineTuneParams()
    ensemble: EnsembleParams = EnsembleParams()
    variants: VariantsParams = VariantsParams()
    evaluate: EvaluateParams = EvaluateParams()
    registry: RegistryParams = RegistryParams()
    serving: ServingParams = ServingParams()

    @model_validator(mode="after")
    def _variants_resolve(self) -> Params:
        self.resolved_variants()  # raises ValueError naming the entry
        return self

    def resolved_variants(self) -> dict[str, Variant]:
        """Every variant, in table order (kind by kind, then as listed), fully resolved."""
        out: dict[str, Variant] = {}
        problems: list[str] = []
        for kind, (section, _stage) in KINDS.items():
            base = getattr(self, section).model_dump(by_alias=True)
            model = FineTuneVariant if kind == "fine_tune" else type(getattr(self, section))
            for name, entry in getattr(self.variants, kind).items():
                where = f"variants.{kind}.{name}"
                entry = entry or {}
                if not VARIANT_NAME.match(name):
                    problems.append(f"{where}: {name!r} is not a valid variant name (a letter, then letters, "
                                    "digits, _ or -, at most 64: it names a DVC stage, a folder and an MLflow run)")
                    continue
                if name in RESERVED_NAMES:
                    problems.append(f"{where}: {name!r} is reserved (evaluate's outputs use it); rename the variant")
                    continue
                if name in out:
                    problems.append(f"{where}: the name is also used by {out[name].stage}; variant names are "
                                    "unique across kinds")
                    continue
                merged = {**base, **{k: ({**base[k], **v} if k in _NESTED and isinstance(v, dict) else v)
                                     for k, v in entry.items()}}
                if merged.get("arch") != base.get("arch") and "arch_kwargs" not in entry:
                    merged["arch_kwargs"] = {}  # the section's builder arguments are its own arch's
                try:
                    settings = model.model_validate(merged)
                except ValidationError as exc:
                    problems.extend(_entry_errors(exc, where, model, merged))
                    continue
                out[name] = Variant(name=name, kind=kind, settings=settings, overrides=dict(entry))
        for v in out.values():
            if v.kind == "fine_tune":
                start = out.get(v.settings.from_)
                if start is None or start.kind != "feature_extract":
                    have = ", ".join(n for n, o in out.items() if o.kind == "feature_extract") or "none"
                    problems.append(f"variants.fine_tune.{v.name}.from = {v.settings.from_!r}: not a "
                                    f"feature_extract variant (have: {have})")
        problems += _resolve_members(out)
        if not any(v.kind in TRAINED_KINDS for v in out.values()) and not problems:
            problems.append("variants: no variant is declared; add one, e.g. variants.scratch.scratch: {}")
        if problems:
            raise ValueError("\n  - ".join(problems))
        return out


def _resolve_members(variants: dict[str, Variant]) -> list[str]:
    """Each ensemble's ``members`` as a list of trained variants (``all``: every one, in table
    order; with fewer than two there is nothing to combine and the entry is left out), in place;
    what is wrong with them."""
    trained = [n for n, v in variants.items() if v.kind in TRAINED_KINDS]
    problems: list[str] = []
    if not trained:  # said once, below
        return problems
    for v in [v for v in variants.values() if v.kind == "ensemble"]:
        where = f"variants.ensemble.{v.name}.members"
        members = trained if v.settings.members == "all" else list(v.settings.members)
        have = ", ".join(trained) or "none"
        if unknown := [m for m in members if m not in trained]:
            problems.append(f"{where}: {', '.join(map(repr, unknown))} is not a trained variant (have: {have}; "
                            "an ensemble's members are scratch, feature_extract or fine_tune variants)")
        elif len(set(members)) != len(members):
            problems.append(f"{where}: lists a variant twice")
        elif len(members) < 2 and v.settings.members == "all":
            del variants[v.name]  # `all` of a single variant: nothing to combine, so no ensemble
        elif len(members) < 2:
            problems.append(f"{where}: an ensemble needs at least two members, and it lists "
                            f"{', '.join(members) or 'none'}; name more, or remove the entry (variants.ensemble: {{}})")
        else:
            variants[v.name] = dataclasses.replace(v, settings=v.settings.model_copy(update={"members": members}))
    return problems


def _entry_errors(exc: ValidationError, where: str, model: type[BaseModel], merged: dict[str, Any]) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join([where, *loc])
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed(model))
            lines.append(f"{key}: unknown key (allowed here: {allowed})")
        elif err["type"] == "missing":
            lines.append(f"{key}: required")
        elif err["type"] == "value_error" or not loc:
            lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
        else:
            value: Any = merged
            for part in loc:
                value = value.get(part, "<missing>") if isinstance(value, dict) else "<n/a>"
            lines.append(f"{key} = {value!r}: {err['msg']}")
    return lines


def _allowed(model: type[BaseModel]) -> list[str]:
    """A section's keys as its class declares them, its own before those it inherits (a variant's
    ``arch`` before the loop's ``epochs``), by their params.yaml names."""
    names: list[str] = []
    for cls in model.__mro__:
        names += [n for n in vars(cls).get("__annotations__", {}) if n in model.model_fields and n not in names]
    return [model.model_fields[n].alias or n for n in names]


def _describe(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) if loc else "(top level)"
    if err["type"] == "extra_forbidden":
        model: Any = Params
        for part in loc[:-1]:
            if isinstance(model, type) and issubclass(model, BaseModel):
                model = model.model_fields[part].annotation
            else:  # dict[str, Section]: this part is a user-chosen key such as a variant name
                model = get_args(model)[1]
        allowed = ", ".join(_allowed(model))
        return f"{key}: unknown key (allowed here: {allowed})"
    if err["type"] == "value_error":  # our own cross-field rules: the message already says it all
        msg = err["msg"].removeprefix("Value error, ")
        return f"{key}: {msg}" if loc else msg
    value: Any = raw
    for part in loc:
        value = value.get(part, "<missing>") if isinstance(value, dict) else "<n/a>"
    msg = err["msg"]
    if loc:
        return f"{key} = {value!r}: {msg}"
    return f"{msg}"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate an already-loaded mapping; ``source`` only labels the error message."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, raw) for e in exc.errors()]
        raise ConfigError(f"{source} is invalid:\n  - " + "\n  - ".join(lines)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``path``; a missing file, bad YAML or bad value raises ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; run from the repository root or pass --params") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(raw, source=str(path))
