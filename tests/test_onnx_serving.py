"""The ONNX Runtime pyfunc (`cnnlab.serving.onnx_pyfunc`) beside the PyTorch one.

Its preprocessing is numpy + Pillow and must give the network exactly the pixels training gave it
(photo-like files: JPEG, CMYK, EXIF-rotated, PNG with alpha, palette, 16-bit grey, a thin strip, a
photo past the split's max_side); its ensemble must answer as the PyTorch ensemble; its execution
providers are chosen from what onnxruntime has, and a GPU it cannot use is reported.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import use_mlflow_store
from photo_folder import draw, encode
from PIL import Image

from cnnlab.data.images import convert_mode, decode_stored, downscale, load_image
from cnnlab.data.preprocess import prepare
from cnnlab.models.classifier import ModelSpec, build_classifier, save_classifier
from cnnlab.serving import onnx_pyfunc
from cnnlab.serving.ensemble import log_ensemble
from cnnlab.serving.onnx_export import onnx_folder
from cnnlab.serving.onnx_pyfunc import (
    OnnxClassifierModel,
    choose_providers,
    log_onnx_model,
)
from cnnlab.tracking.runs import tracked_run

CLASSES = ["a", "b", "c", "d"]
MAX_SIDE = 256  # the split stage's one-time shrink


def _photos() -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    photo = draw(1, 4, rng, (480, 333))
    files = {kind: encode(photo, kind) for kind in ("jpeg", "png_alpha", "cmyk", "exif_rotated", "grey")}
    buf = io.BytesIO()
    photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=17).save(buf, "PNG", transparency=3)
    files["palette"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257).save(buf, "PNG")  # 16-bit grey
    files["grey16"] = buf.getvalue()
    buf = io.BytesIO()
    photo.resize((301, 7)).save(buf, "PNG")  # a thin strip
    files["strip"] = buf.getvalue()
    return files


PHOTOS = _photos()


def _spec(mode: str, size: int, arch: str = "simple_cnn") -> ModelSpec:
    channels = 1 if mode == "L" else 3
    return ModelSpec(kind="scratch", arch=arch, classes=CLASSES, mode=mode, image_size=size,
                     mean=[0.45] * channels, std=[0.27] * channels)


def _served_pixels(model: OnnxClassifierModel, data: bytes) -> np.ndarray:
    """What the ONNX pyfunc hands its network for ``data``."""
    seen: list[np.ndarray] = []
    member = model._members[0]
    forward = member.forward
    member.forward = lambda batch: (seen.append(batch.copy()), forward(batch))[1]
    try:
        model.classify([data])
    finally:
        member.forward = forward
    return seen[0][0]


@pytest.mark.parametrize("mode, size", [("RGB", 28), ("L", 28), ("RGB", 97)])
def test_served_pixels_are_the_training_pixels_byte_for_byte(tmp_path: Path, mode: str, size: int) -> None:
    """Training reads each image as the split stored it (upright, converted, shrunk past max_side;
    here a PNG, lossless) through `prepare`; serving reads the raw upload through numpy + Pillow."""
    spec = _spec(mode, size)
    torch.manual_seed(0)
    model = build_classifier(spec).eval()
    save_classifier(model, spec, tmp_path / "clf")
    graph = onnx_folder(model, spec, tmp_path / "clf", tmp_path / "onnx")
    served = OnnxClassifierModel()
    served.load_context(mlflow.pyfunc.PythonModelContext(
        {"model": str(graph), "pytorch": str(tmp_path / "clf")}, {"max_side": MAX_SIDE}))
    for kind, data in PHOTOS.items():
        path = tmp_path / f"{kind}.img"
        path.write_bytes(data)
        stored = io.BytesIO()
        downscale(convert_mode(load_image(path, max_pixels=10**8), mode), MAX_SIDE).save(stored, "PNG")
        trained_on = prepare(decode_stored(stored.getvalue()), mode=mode, size=size).numpy()
        got = _served_pixels(served, data)
        assert got.dtype == np.uint8 and got.shape == trained_on.shape == (len(mode) if mode == "L" else 3, size, size)
        assert np.array_equal(got, trained_on), f"{kind}: {np.abs(got.astype(int) - trained_on).max()} levels apart"


def test_the_onnx_ensemble_answers_as_the_pytorch_ensemble(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two members of other input forms (grey 28 px, colour 40 px), each with its own temperature
    and views, then the ensemble's temperature: the same numbers on either runtime."""
    use_mlflow_store(monkeypatch, tmp_path)
    members, networks = {}, {}
    for name, spec in {"grey": _spec("L", 28, "tinyvgg"), "colour": _spec("RGB", 40)}.items():
        torch.manual_seed(len(name))
        model = build_classifier(spec).eval()
        save_classifier(model, spec, tmp_path / name)
        members[name] = tmp_path / name
        networks[name] = (onnx_folder(model, spec, tmp_path / name, tmp_path / f"{name}.onnx"), tmp_path / name)
    settings = {"grey": {"temperature": 1.7, "tta": ["hflip"]}, "colour": {"temperature": 0.6, "tta": []}}
    examples = list(PHOTOS.values())[:2]
    with tracked_run(experiment="onnx-ensemble", run_name="duo", tags={}, params={}):
        torch_uri = log_ensemble(members, settings, example_images=examples, temperature=1.3,
                                 conformal_threshold=0.4).model_uri
        onnx_uri = log_onnx_model(networks, members=settings, example_images=examples, temperature=1.3,
                                  conformal_threshold=0.4).model_uri
    frame = pd.DataFrame({"image": list(PHOTOS.values())}, dtype=object)
    want = mlflow.pyfunc.load_model(torch_uri).predict(frame)
    got = mlflow.pyfunc.load_model(onnx_uri).predict(frame)
    assert got["label"].tolist() == want["label"].tolist()
    np.testing.assert_allclose([list(p.values()) for p in got["probabilities"]],
                               [list(p.values()) for p in want["probabilities"]], atol=1e-5)
    assert [list(s) for s in got["prediction_set"]] == [list(s) for s in want["prediction_set"]]
    # And not merely because both ignore the settings: without the members' temperatures it differs.
    plain = mlflow.pyfunc.load_model(onnx_uri, model_config={"members": [
        {"name": "grey", "temperature": 1.0, "tta": ["hflip"]}, {"name": "colour", "temperature": 1.0, "tta": []}]})
    other = np.array([list(p.values()) for p in plain.predict(frame)["probabilities"]])
    assert np.abs(other - np.array([list(p.values()) for p in got["probabilities"]])).max() > 1e-3


def test_providers_auto_takes_the_best_available_and_a_list_is_checked() -> None:
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = choose_providers("auto")
    assert chosen[-1] == "CPUExecutionProvider" and set(chosen) <= set(available)
    assert chosen == [p for p in onnx_pyfunc.PREFERRED_PROVIDERS if p in available]
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="NoSuchExecutionProvider.*available"):
        choose_providers(["NoSuchExecutionProvider"])


def test_a_gpu_without_the_cuda_provider_is_reported_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(onnx_pyfunc.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(onnx_pyfunc, "nvidia_gpu_present", lambda: True)
    with caplog.at_level(logging.WARNING, logger=onnx_pyfunc.__name__):
        assert choose_providers("auto") == ["CPUExecutionProvider"]
    assert "NVIDIA GPU is present" in caplog.text and "onnxruntime-gpu==" in caplog.text
    caplog.clear()
    monkeypatch.setattr(onnx_pyfunc.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger=onnx_pyfunc.__name__):
        assert choose_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert not caplog.text


def test_each_server_worker_takes_its_share_of_the_cores() -> None:
    """`mlflow models serve -w N` runs ``uvicorn --workers N``: a worker reads N off its own command
    line (one worker) or its parent's (several), and runs its network on cores / N threads."""
    import subprocess
    import sys

    from cnnlab.serving.protocol import server_threads, server_workers, usable_cores

    probe = ("import sys; from cnnlab.serving.protocol import server_threads, server_workers; "
             "print(server_workers(), server_threads(), server_threads(reserve=1))")
    # Without the flag: one worker (pytest's command line has none, nor has its parent's).
    for argv, workers in ((["--workers", "3"], 3), (["-w", "2"], 2), ([], 1)):
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, check=True)
        got_workers, got_threads, got_reserved = map(int, done.stdout.split())
        assert got_workers == workers
        assert got_threads == max(1, min(4, usable_cores() // workers))
        # ONNX Runtime leaves one core to the request handling (2 cores, 1 worker: 1 thread, not 2).
        assert got_reserved == max(1, min(4, usable_cores() // workers - 1))
    assert server_workers() >= 1 and 1 <= server_threads() <= 4
