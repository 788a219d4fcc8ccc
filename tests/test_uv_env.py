"""A logged model loads where MLflow builds its environment from the model's requirements.txt.

`mlflow models predict` / `serve` without ``--env-manager local``, `build-docker` and serving
platforms install that file into an empty environment, and nothing else: so a scratch model and
a transfer model (which needs timm) are logged for real on PyTorch, and the transfer model on ONNX
Runtime as the registered champion (the default runtime). The slow tests have
`mlflow models predict --env-manager uv` build each PyTorch one's environment and predict, against
the pyfunc's prediction here on the same real images, and a real `mlflow models serve --env-manager
uv` serve the champion from an environment without torch, answering as the PyTorch model does. The fast tests read the requirements, and
check how `cnnlab.serving.model_env` reads them off the code on a package made up for it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import matplotlib.cbook
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import REPO, use_mlflow_store
from helpers.tiny_model import encode, train_tiny

from cnnlab.data.preprocess import prepare
from cnnlab.serving.model_env import UnresolvedImportError, served_requirements
from cnnlab.models.classifier import ModelSpec, build_pretrained_classifier, save_classifier
from cnnlab.models.classifier import load_classifier
from cnnlab.serving.onnx_export import onnx_folder
from cnnlab.serving.onnx_pyfunc import log_onnx_model
from cnnlab.serving.pyfunc import log_classifier, predict_images

CLASSES = ["dark", "mid", "bright"]
CHAMPION_NAME = "uv-env-classifier"
LEVELS = {0: 40, 1: 128, 2: 215}
# Real encoded files: a photo (JPEG), a PNG with alpha, and dark / mid / bright noise in the
# formats clients send, so that both models give more than one label.
IMAGES = [
    Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).read_bytes(),
    Path(matplotlib.cbook.get_sample_data("logo2.png", asfileobj=False)).read_bytes(),
    encode("RGB", (40, 30), "JPEG", 11, level=LEVELS[0]),
    encode("L", (24, 24), "PNG", 12, level=LEVELS[1]),
    encode("RGB", (30, 40), "PNG", 13, level=LEVELS[2]),
    encode("RGBA", (20, 20), "PNG", 14, level=LEVELS[2]),
]
EXAMPLES = [encode("RGB", (20, 20), "PNG", 0), encode("L", (9, 30), "JPEG", 1)]
# The first build on a machine whose uv cache lacks the pinned wheels downloads torch with its
# CUDA libraries (several GB); with the cache `make setup` fills, a build takes under a minute.
PREDICT_TIMEOUT_S = 1800
# What the serving code of every model imports (PIL is distributed as pillow), plus timm where
# the model's network is a timm backbone: not the offline weights package, since a logged
# transfer model carries its weights (artifacts/.../weights.pt).
SCRATCH_NEEDS = {"mlflow-skinny", "numpy", "pandas", "pillow", "torch"}
TRANSFER_NEEDS = SCRATCH_NEEDS | {"timm"}
ONNX_NEEDS = {"mlflow-skinny", "numpy", "pandas", "pillow", "onnxruntime"}
# The training stack, which the ONNX model's environment must go without.
TRAINING_STACK = ("torch", "torchvision", "timm", "nvidia", "triton", "cnnlab")


@dataclass
class Logged:
    model_uri: str  # as a user names it: runs:/<run id>/model, or models:/<name>@champion
    model_dir: Path
    local: Path  # the logged model, downloaded
    requirements: dict[str, str]  # normalized name -> pinned version


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(text: str) -> dict[str, str]:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    pins = {}
    for line in lines:
        name, sep, pinned = line.partition("==")
        assert sep, f"unpinned requirement {line!r}"
        pins[_normalize(name)] = pinned
    return pins


def _rgb_levels(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = []
    for i in range(n):
        with Image.open(io.BytesIO(encode("RGB", (20, 20), "PNG", 100 + i, LEVELS[i % 3]))) as im:
            images.append(prepare(im, mode="RGB", size=32))
    return torch.stack(images), torch.tensor([i % 3 for i in range(n)])


def train_transfer(folder: Path) -> None:
    """EfficientNet-Lite0 with its real offline ImageNet weights, the head trained for a moment
    on dark / mid / bright: the "pretrained" kind the feature_extract and fine_tune stages log."""
    spec = ModelSpec(kind="pretrained", arch="efficientnet_lite0", classes=CLASSES, mode="RGB", image_size=32,
                     mean=[0.5] * 3, std=[0.5] * 3, kwargs={"dropout": 0.0, "hidden": None, "weights": "default"})
    torch.manual_seed(0)
    model = build_pretrained_classifier(spec).eval()  # eval: frozen BatchNorm statistics
    for p in model.net.features.parameters():
        p.requires_grad_(False)
    x, y = _rgb_levels(30)
    optimizer = torch.optim.Adam(model.net.head.parameters(), lr=0.05)
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    save_classifier(model, spec, folder)


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Logged]]:
    """A scratch and a transfer model, logged once into a fresh store; the transfer model is also
    logged on ONNX Runtime and registered as the champion, as the register stage does with the best
    variant."""
    root = tmp_path_factory.mktemp("uv_env")
    with pytest.MonkeyPatch.context() as mp:
        uri = use_mlflow_store(mp, root)
        mp.setenv("CNNLAB_OFFLINE", "1")
        # A URI an earlier test set in this process outranks the variable: set both.
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("uv-env")
        train_tiny(root / "scratch")
        train_transfer(root / "transfer")
        out = {}
        for kind in ("scratch", "transfer", "onnx"):
            folder = root / ("transfer" if kind == "onnx" else kind)
            with mlflow.start_run(run_name=kind) as run:
                if kind == "onnx":
                    model, spec = load_classifier(folder)
                    log_onnx_model({None: (onnx_folder(model, spec, folder, root / "onnx"), folder)},
                                   example_images=EXAMPLES)
                else:
                    log_classifier(folder, example_images=EXAMPLES)
            model_uri = f"runs:/{run.info.run_id}/model"
            local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(root / f"{kind}_logged")))
            if kind == "onnx":
                registered = mlflow.register_model(model_uri, CHAMPION_NAME)
                mlflow.MlflowClient().set_registered_model_alias(CHAMPION_NAME, "champion", registered.version)
                model_uri = f"models:/{CHAMPION_NAME}@champion"
            out[kind] = Logged(model_uri, folder, local, _pins((local / "requirements.txt").read_text()))
        yield out


def _lock_pins() -> dict[str, str]:
    text = (REPO / "requirements.lock").read_text(encoding="utf-8")
    return {_normalize(n): v for n, v in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", text, re.M)}


@pytest.mark.parametrize("kind, needs", [("scratch", SCRATCH_NEEDS), ("transfer", TRANSFER_NEEDS),
                                         ("onnx", ONNX_NEEDS)])
def test_requirements_name_what_the_model_imports_at_the_locked_versions(
    logged: dict[str, Logged], kind: str, needs: set[str]
) -> None:
    pins = logged[kind].requirements
    assert set(pins) == needs
    lock = _lock_pins()
    for name, pinned in pins.items():
        # The installed version without a local tag ("+cpu": no such release on PyPI)...
        assert pinned == version(name).split("+")[0], name
        # ...which is the lock's: a CI machine builds the model's environment from these pins.
        assert pinned == lock[name], f"{name}: logged {pinned}, requirements.lock {lock[name]}"
    # The weights travel inside the model, so its environment needs no weights package.
    assert list(logged[kind].local.glob("artifacts/*/weights.pt"))


PROBE_ENTRY = """\
from probe_pkg.serve import Model
"""
PROBE_FILES = {
    "probe_pkg/__init__.py": "",
    "probe_pkg/serve.py": """\
        from typing import TYPE_CHECKING
        import mlflow.models
        import yaml
        from . import helpers
        if TYPE_CHECKING:
            import sklearn
        class Model:
            pass
    """,
    "probe_pkg/helpers.py": """\
        def on_the_path():
            import tqdm
            return tqdm
        def never_called():
            import matplotlib
    """,
}


def _probe_package(root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    for rel, text in PROBE_FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))
    entry = root / "entry.py"
    entry.write_text(PROBE_ENTRY)
    monkeypatch.syspath_prepend(str(root))
    return entry, root / "probe_pkg"


def test_module_level_imports_and_the_lazy_ones_the_model_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry, package = _probe_package(tmp_path, monkeypatch)

    def exercise() -> None:
        import probe_pkg.helpers

        probe_pkg.helpers.on_the_path()

    want = [f"mlflow-skinny=={version('mlflow-skinny')}", f"PyYAML=={version('PyYAML')}", f"tqdm=={version('tqdm')}"]
    # yaml: imported by serve.py at module level; tqdm: by a function the exercise ran. Not
    # matplotlib (never called), nor scikit-learn (type checkers only); mlflow-skinny for the server.
    assert served_requirements(entry, package, exercise) == want
    # mlflow is also imported, and of the three distributions with an ``mlflow`` folder it names
    # mlflow-skinny: the pyfunc loader and the scoring server, without the tracking server's stack.
    assert served_requirements(entry, package, exercise, server=()) == want


def test_an_import_no_distribution_provides_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry, package = _probe_package(tmp_path, monkeypatch)
    entry.write_text(PROBE_ENTRY + "import no_such_module_anywhere_5b1e\n")
    with pytest.raises(UnresolvedImportError, match="no_such_module_anywhere_5b1e"):
        served_requirements(entry, package, lambda: None)


def _installed_by_uv(log: str) -> dict[str, str]:
    """What uv reported installing (" + name==version" lines): the environment MLflow built lives
    in a temporary folder that `mlflow models predict` removes when it exits."""
    return {_normalize(n): v for n, v in re.findall(r"^ \+ (\S+)==(\S+)$", log, re.M)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["scratch", "transfer"])
def test_mlflow_models_predict_in_a_uv_built_env_gives_the_same_labels(
    logged: dict[str, Logged], kind: str, tmp_path: Path
) -> None:
    bin_dir = Path(sys.executable).parent
    if shutil.which("uv", path=os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])) is None:
        pytest.skip("uv is not installed (make setup installs it unless INSTALLER=pip)")
    model = logged[kind]
    want = mlflow.pyfunc.load_model(model.model_uri).predict(pd.DataFrame({"image": IMAGES}))
    # Otherwise comparing labels would not tell a working model from a constant one.
    assert want["label"].nunique() > 1, want["label"].tolist()

    request, output = tmp_path / "request.json", tmp_path / "predictions.json"
    rows = [[base64.b64encode(b).decode()] for b in IMAGES]
    request.write_text(json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the checkout
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])  # MLflow runs `uv` from PATH
    # Each `mlflow models predict` builds a fresh environment under a new temporary folder.
    env["TMPDIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "predict", "-m", model.model_uri, "-i", str(request),
         "-t", "json", "-o", str(output), "--env-manager", "uv"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=PREDICT_TIMEOUT_S,
    )
    assert done.returncode == 0, f"mlflow models predict failed:\n{done.stderr[-6000:]}"

    installed = _installed_by_uv(done.stderr)
    # Built from the model's pins, by uv; timm only where the model needs it...
    assert {n: installed.get(n) for n in model.requirements} == model.requirements, done.stderr[-6000:]
    assert ("timm" in installed) == (kind == "transfer")
    # ...and without cnnlab: the model's code came from its code/ folder.
    assert not [n for n in installed if n.startswith("cnnlab")]

    got = pd.DataFrame(json.loads(output.read_text())["predictions"])
    assert got["label"].tolist() == want["label"].tolist()
    assert got["label_id"].tolist() == want["label_id"].tolist()
    for g, w in zip(got["probabilities"], want["probabilities"]):
        assert g.keys() == w.keys()
        np.testing.assert_allclose(list(g.values()), list(w.values()), atol=1e-5)


@pytest.mark.slow
def test_the_onnx_champion_serves_from_a_uv_env_without_torch(logged: dict[str, Logged], tmp_path: Path) -> None:
    """`mlflow models serve --env-manager uv` of the champion: MLflow builds its environment from the
    model's own requirements (no torch, timm or CUDA wheels), and the real server answers real
    Fashion-MNIST test images and photos as the PyTorch model it was exported from does."""
    from helpers.fashion_model import fashion_subset, png

    from helpers.served import serve_and_predict

    bin_dir = Path(sys.executable).parent
    if shutil.which("uv", path=os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])) is None:
        pytest.skip("uv is not installed (make setup installs it unless INSTALLER=pip)")
    pixels, _ = fashion_subset("t10k", per_class=2)
    images = [png(p) for p in pixels] + IMAGES
    model, spec = load_classifier(logged["onnx"].model_dir)
    want = predict_images(model.eval(), spec, images)  # PyTorch, in this process
    assert want["label"].nunique() > 1, want["label"].tolist()

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the checkout
    env["TMPDIR"] = env["MLFLOW_ENV_ROOT"] = str(tmp_path)  # where MLflow builds the environment
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])  # MLflow runs `uv` from PATH
    got = serve_and_predict(logged["onnx"].model_uri, tmp_path, images, timeout_s=PREDICT_TIMEOUT_S,
                            env=env, env_manager="uv")
    assert [p["label"] for p in got] == want["label"].tolist()
    np.testing.assert_allclose([list(p["probabilities"].values()) for p in got],
                               [list(p.values()) for p in want["probabilities"]], atol=1e-4)

    site = [p for p in tmp_path.rglob("site-packages") if p.is_dir()]
    assert site, "no environment was built under the test's folders"
    installed = {p.name.lower() for s in site for p in s.iterdir()}
    assert "onnxruntime" in installed and "mlflow" in installed  # mlflow: the import name of mlflow-skinny
    assert not [n for n in installed if n.startswith(TRAINING_STACK)], sorted(installed)
    log = next(tmp_path.glob("serve-*.log")).read_text()
    assert "CPUExecutionProvider" in log  # the provider it loaded, said at start
