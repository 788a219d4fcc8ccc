"""The frozen backbone's pooled features, computed once per image and kept on disk.

`feature_extract` trains its head on them, and `evaluate` scores the feature_extract model on
the cached test features instead of running the backbone over the test split a second time.
A cached split is used only when its record in ``meta.json`` matches exactly: the trunk's
digest (its weights, input size, colour mode and normalization), the split's manifest digest,
the precision it was computed in, and the file's own sha256. Anything else (other weights, a
re-split, a truncated or edited file) is recomputed or, in `evaluate`, not used, with a message.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from cnnlab.data.shards import content_digest
from cnnlab.models.classifier import Classifier
from cnnlab.utils.files import file_digest, write_json

_log = logging.getLogger(__name__)

META = "meta.json"


class Trunk(nn.Module):
    """A backbone Classifier without its head: uint8 images -> pooled features."""

    def __init__(self, clf: Classifier) -> None:
        super().__init__()
        self.clf = clf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.clf.mean) / self.clf.std
        return self.clf.net.features(self.clf.net.to_rgb(x))


def trunk_digest(clf: Classifier, *, arch: str, mode: str, image_size: int) -> str:
    """Identifies what the trunk computes: its architecture, input and every weight and buffer."""
    import timm

    h = hashlib.sha256(json.dumps([arch, mode, image_size, torch.__version__, timm.__version__]).encode())
    for t in (clf.mean, clf.std):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for name, t in sorted(clf.net.features.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def manifest_digest(manifest: Path) -> str:
    """Identifies a split's images: its manifest and its shards (`cnnlab.data.shards.content_digest`).
    The keys alone would vouch for stale features when a stage re-writes the same keys with new
    pixels (another augmentation policy, another split.max_side or color_mode)."""
    return content_digest(manifest.parent, manifest.stem)


class FeatureCache:
    """``<dir>/<split>.pt`` ({"features", "labels"}) plus ``meta.json`` saying what made each."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _meta(self) -> dict:
        try:
            meta = json.loads((self.folder / META).read_text(encoding="utf-8"))
            return meta if isinstance(meta, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_meta(self, meta: dict) -> None:
        write_json(self.folder / META, meta)

    def load(self, split: str, record: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(features, labels) when ``split`` was cached with exactly ``record``
        (trunk, manifest, precision), else None; a damaged file is reported and ignored."""
        entry = self._meta().get(split)
        if not isinstance(entry, dict) or {k: entry.get(k) for k in record} != record:
            return None
        path = self.folder / f"{split}.pt"
        if not path.exists() or file_digest(path) != entry.get("sha256"):
            _log.warning("%s does not match the sha256 recorded in %s (truncated or edited); it is not used",
                         path, self.folder / META)
            return None
        data = torch.load(path, map_location="cpu", weights_only=True)
        return data["features"], data["labels"]

    def save(self, split: str, record: dict, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Write ``split`` atomically; its record is dropped first and re-added last, so a crash in
        between never leaves a record that vouches for another file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self._meta()
        if meta.pop(split, None) is not None:
            self._write_meta(meta)
        path = self.folder / f"{split}.pt"
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"features": features.contiguous(), "labels": labels}, tmp)
        tmp.replace(path)
        meta[split] = {**record, "sha256": file_digest(path), "count": len(labels)}
        self._write_meta(meta)
