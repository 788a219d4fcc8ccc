"""Damaged files a stage wrote (truncated by a crash, edited by hand): a clear error that names the
file and what to run, never a half-loaded model, never a silent re-use of a stale cache."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from cnnlab.utils.files import atomic_write
from cnnlab.models.classifier import load_classifier
from cnnlab.training.checkpoint import load_checkpoint
from cnnlab.training.features import FeatureCache
from helpers.tiny_model import train_tiny


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "tiny"
    train_tiny(folder, steps=2)
    return folder


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _weights_with(folder: Path, edit) -> None:
    state = torch.load(folder / "weights.pt", weights_only=True)
    edit(state)
    torch.save(state, folder / "weights.pt")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "a tensor missing", "a tensor reshaped", "extra tensor",
                                    "pickled code"])
def test_damaged_weights_are_refused_whole_with_the_file_and_the_fix(model_dir: Path, damage: str):
    weights = model_dir / "weights.pt"
    if damage == "truncated":
        _truncate(weights)
    elif damage == "garbage":
        weights.write_bytes(b"\x80\x04not a checkpoint")
    elif damage == "a tensor missing":
        _weights_with(model_dir, lambda s: s.pop(sorted(s)[-1]))
    elif damage == "a tensor reshaped":
        _weights_with(model_dir, lambda s: s.update({k: torch.zeros(3, 3) for k in sorted(s)[:1]}))
    elif damage == "extra tensor":
        _weights_with(model_dir, lambda s: s.update({"net.sneaky": torch.zeros(1)}))
    else:  # weights_only=True: an object that would run code on load is not unpickled at all
        torch.save({"x": shutil.rmtree}, weights)
    with pytest.raises(ValueError) as err:
        load_classifier(model_dir)
    message = str(err.value)
    assert message.startswith(f"{weights}: cannot load weights for tinyvgg")
    assert f"dvc checkout {model_dir}" in message and "dvc repro" in message
    assert "\n" not in message  # one line, not torch's page of missing and unexpected keys


@pytest.mark.parametrize("damage", ["truncated", "not an object", "unknown field", "unknown arch", "wrong class count"])
def test_a_damaged_spec_names_spec_json_and_the_fix(model_dir: Path, damage: str):
    spec_path = model_dir / "spec.json"
    spec = json.loads(spec_path.read_text())
    if damage == "truncated":
        _truncate(spec_path)
    elif damage == "not an object":
        spec_path.write_text("[1, 2]")
    elif damage == "unknown field":
        spec_path.write_text(json.dumps({**spec, "colour": "blue"}))
    elif damage == "unknown arch":
        spec_path.write_text(json.dumps({**spec, "arch": "no-such-net"}))
    else:  # builds, but the weights' last layer has 3 outputs: refused by the weights check
        spec_path.write_text(json.dumps({**spec, "classes": ["a", "b"]}))
    with pytest.raises(ValueError) as err:
        load_classifier(model_dir)
    message = str(err.value)
    where = "weights.pt" if damage == "wrong class count" else "spec.json"
    assert message.startswith(f"{model_dir / where}: "), message
    assert f"dvc checkout {model_dir}" in message, message


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    """The WARNING+ messages logged under "cnnlab" since the last call, then forgets them."""
    text = "\n".join(r.getMessage() for r in caplog.records
                     if r.levelno >= logging.WARNING and r.name.startswith("cnnlab"))
    caplog.clear()
    return text


def test_a_damaged_checkpoint_is_named_and_never_resumed(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A checkpoint only saves time: a damaged one is reported and training starts over (the
    same outputs, since runs are deterministic), rather than stopping the stage."""
    caplog.set_level(logging.WARNING, logger="cnnlab")
    path = tmp_path / "checkpoints" / "v.pt"
    state = {"fingerprint": "abc", "epoch": 3, "model": {"w": torch.ones(2)}}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    assert load_checkpoint(path, "abc")["epoch"] == 3
    assert load_checkpoint(path, "other") is None  # made with other params or data
    assert f"ignoring checkpoint {path}: it was made with other params or data" in _warnings(caplog)
    _truncate(path)
    assert load_checkpoint(path, "abc") is None
    assert f"ignoring checkpoint {path}: cannot be read safely" in _warnings(caplog)
    torch.save({"fingerprint": "abc", "evil": shutil.rmtree}, path)
    assert load_checkpoint(path, "abc") is None  # not unpickled: weights_only


@pytest.mark.parametrize("damage", ["truncated", "edited", "meta edited"])
def test_a_damaged_feature_cache_is_recomputed_not_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                           damage: str):
    caplog.set_level(logging.WARNING, logger="cnnlab")
    cache = FeatureCache(tmp_path / "features")
    record = {"trunk": "t1", "manifest": "m1", "precision": "fp32"}
    features, labels = torch.arange(12.0).reshape(4, 3), torch.tensor([0, 1, 2, 0])
    cache.save("test", record, features, labels)
    hit = cache.load("test", record)
    assert hit is not None and torch.equal(hit[0], features)
    path = tmp_path / "features" / "test.pt"
    if damage == "truncated":
        _truncate(path)
    elif damage == "edited":  # loadable, other numbers: only the recorded sha256 tells
        torch.save({"features": features + 1, "labels": labels}, path)
    else:  # the record claims another trunk: a stale cache for this one
        meta = json.loads((tmp_path / "features" / "meta.json").read_text())
        meta["test"]["trunk"] = "t0"
        (tmp_path / "features" / "meta.json").write_text(json.dumps(meta))
    assert cache.load("test", record) is None
    if damage != "meta edited":
        assert f"{path} does not match the sha256" in _warnings(caplog)
