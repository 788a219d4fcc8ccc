"""split.color_mode: grey, past the split: colour photos become one-channel training tensors, a
one-channel model, and a served model that turns any upload into the same grey its training saw."""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cnnlab.config import SplitParams
from cnnlab.data.preprocess import prepare
from cnnlab.data.shards import iter_images, read_manifest
from cnnlab.data.split import run_split
from cnnlab.models.classifier import load_classifier
from cnnlab.training import engine
from cnnlab.training.engine import predict_logits
from conftest import make_image_folder
from helpers.served import publish_variant
from helpers.variant_runs import train_scratch

CLASSES = {"red": 10, "green": 10, "blue": 10}


@pytest.fixture
def grey_split(tmp_path: Path) -> Path:
    """RGB source images (make_image_folder: (v, 255 - v, 100)), split with color_mode grey."""
    raw = tmp_path / "raw"
    make_image_folder(raw / "images", CLASSES, size=(24, 20), mode="RGB")
    (raw / "source.json").write_text(json.dumps({"source": "local", "format": "image_folder"}))
    split = tmp_path / "split"
    run_split(raw, split, SplitParams(val_fraction=0.2, test_fraction=0.2, max_train_per_class=None,
                                      max_val_per_class=None, max_test_per_class=None, max_image_pixels=10**6,
                                      max_side=None, color_mode="grey"), seed=0)
    return split


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_grey_split_trains_a_one_channel_model_that_serves_colour_uploads(
    store: str, grey_split: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, tuple[int, ...]] = {}

    def fit(model, train, val, cfg, **kw):  # the real fit; only the shapes it gets are noted
        seen["train"], seen["val"] = tuple(train.images.shape), tuple(val.images.shape)
        return engine.fit(model, train, val, cfg, **kw)

    monkeypatch.setattr("cnnlab.stages.variant.fit", fit)
    result, out = train_scratch(grey_split, None, tmp_path / "grey", variant="grey", dropout=0.0)

    n_train = len(read_manifest(grey_split, "train"))
    assert seen["train"] == (n_train, 1, 28, 28) and seen["val"][1:] == (1, 28, 28)
    model, spec = load_classifier(out.model_dir)
    assert spec.mode == "L" and len(spec.mean) == len(spec.std) == 1
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == 1
    assert mlflow.MlflowClient().get_run(result.run_id).info.status == "FINISHED"

    # The served model gets the original colour photos: it must make them the grey the split
    # made, so its answers equal the saved model's on the split's own stored grey images.
    rows = read_manifest(grey_split, "test")
    colour = [(grey_split.parent / "raw" / r["source"]).read_bytes() for r in rows]
    with Image.open(io.BytesIO(colour[0])) as im:
        assert im.mode == "RGB"
    served = mlflow.pyfunc.load_model(publish_variant(result.run_id, out.model_dir, grey_split)).predict(pd.DataFrame({"image": colour}))
    grey = []
    for r, data in zip(rows, iter_images(grey_split, "test"), strict=True):
        assert r["stored"] == "png: RGB -> L", r
        with Image.open(io.BytesIO(data)) as im:
            assert im.mode == "L"
            grey.append(prepare(im, mode="L", size=spec.image_size))
    probs = torch.softmax(predict_logits(model, torch.stack(grey), batch_size=8, device=torch.device("cpu")), 1)
    assert list(served["label_id"]) == probs.argmax(1).tolist()
    np.testing.assert_allclose(served["confidence"].to_numpy(), probs.max(1).values.numpy(), atol=1e-5)
