"""A trained variant made servable as the `register` stage makes it (`cnnlab.serving.publish`)."""

from __future__ import annotations

from pathlib import Path

from cnnlab.serving.publish import example_images, publish, serving_limits


def publish_variant(run_id: str, model_dir: Path, split_dir: Path) -> str:
    """The pyfunc URI of ``model_dir`` logged into its run ``run_id`` (in the current tracking store)."""
    return publish(run_id, model_dir, limits=serving_limits(split_dir), examples=example_images(split_dir))
