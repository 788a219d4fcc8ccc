"""Shared fixtures: real image folders and tiny IDX datasets written at test time, and a running
team stack (`team_stack`: PostgreSQL + SeaweedFS + MLflow with auth, `cnnlab_stack.stack`)."""

from __future__ import annotations

import contextlib
import gzip
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# The benchmarks' helpers (bench/project_copy.py, the load clients) serve the slow tests too.
sys.path.insert(0, str(REPO / "bench"))


@pytest.fixture(autouse=True)
def cnnlab_logging() -> Iterator[None]:
    """The "cnnlab" logger as the test found it: an entry point run in-process (a stage script's
    `main`, `python -m cnnlab`'s) adds a stderr handler and a level for the rest of its process."""
    import logging

    logger = logging.getLogger("cnnlab")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers, logger.level, logger.propagate = saved


def use_mlflow_store(mp: pytest.MonkeyPatch, root: Path) -> str:
    """Point MLflow (this process and its subprocesses) at a fresh sqlite store in ``root``, for
    as long as ``mp`` lasts; returns the tracking URI."""
    import mlflow.tracking._model_registry.utils
    import mlflow.tracking._tracking_service.utils
    import mlflow.tracking.fluent

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    # An earlier test's mlflow.set_tracking_uri / set_experiment outranks the variable (and
    # exports its experiment id): forget both, so this store is the one used.
    mp.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    mp.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", None)
    mp.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mp.chdir(root)  # MLflow's default artifact root is ./mlruns: keep it out of the checkout
    mp.setattr(sys, "path", list(sys.path))  # load_model prepends each model's code/ dir
    return uri


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the IDX format, gzipped as the originals are."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_idx(tmp_path: Path) -> Path:
    """A raw folder shaped like the download stage's Fashion-MNIST output: 10 classes, 12+6 per class."""
    raw = tmp_path / "raw"
    (raw / "idx").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, per_class in (("train", 12), ("t10k", 6)):
        labels = np.repeat(np.arange(10), per_class)
        rng.shuffle(labels)
        # Each class gets its own brightness so a test can check labels travel with images.
        images = (labels[:, None, None] * 20 + rng.integers(0, 10, (len(labels), 28, 28))).astype(np.uint8)
        write_idx(raw / "idx" / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(raw / "idx" / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    (raw / "source.json").write_text('{"source": "fashion_mnist", "format": "idx"}')
    return raw


def make_image_folder(root: Path, classes: dict[str, int], *, size=(24, 20), mode="RGB", ext="png") -> Path:
    """``root/<class>/<i>.<ext>``: real images whose colour encodes the class."""
    for c, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            colour = (40 * c + i) % 256
            img = Image.new(mode, size, colour if mode == "L" else (colour, 255 - colour, 100))
            img.save(root / name / f"{i:03d}.{ext}")
    return root


@pytest.fixture
def static_server(tmp_path: Path):
    """A real HTTP server on 127.0.0.1 serving a fresh folder; yields (folder, base_url)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    root = tmp_path / "served"
    root.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextlib.contextmanager
def stack_folder() -> Iterator[Path]:
    """A fresh folder for a `cnnlab_stack.stack.Stack` (its ``stack`` child), removed afterwards.

    Not pytest's tmp_path: that is mode 0700, and as root PostgreSQL runs as the ``postgres`` OS
    user, which must be able to enter every parent of the stack's folder.
    """
    folder = Path(tempfile.mkdtemp(prefix="cnnlab-stack-"))
    folder.chmod(0o755)
    try:
        yield folder / "stack"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def team_stack():
    """A running team stack on free loopback ports (all three ``0``), shared by the session;
    yields the `cnnlab_stack.stack.Stack` (``client_env()`` for MLflow clients, ``s3`` for the bucket).
    Always stopped and removed at the end. Skips only when PostgreSQL's server binaries are
    missing (`make test` installs them: the Makefile's stack-deps)."""
    from cnnlab_stack.stack import Stack, StackError, find_postgres

    try:
        find_postgres()
    except StackError as e:
        pytest.skip(str(e))
    with stack_folder() as folder:
        stack = Stack(folder, ports={"mlflow": 0, "postgres": 0, "s3": 0})
        try:
            stack.up()
            yield stack
        finally:
            stack.down()


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    return use_mlflow_store(monkeypatch, tmp_path)


@pytest.fixture
def split_dir(tiny_idx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("CNNLAB_OFFLINE", "1")
    from cnnlab.config import SplitParams
    from cnnlab.data.split import run_split

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "split"
    run_split(tiny_idx, out, SplitParams(val_fraction=0.2, test_fraction=0.2, max_train_per_class=6,
                                         max_val_per_class=3, max_test_per_class=2, max_image_pixels=10_000,
                                         max_side=None, color_mode="auto"), seed=0)
    return out
