"""The served network as an ONNX graph, checked against the PyTorch model it was exported from.

The graph is the whole `Classifier`: uint8 (N, C, H, W) in, logits out, the normalization inside,
a dynamic batch axis. Temperature, test-time views and prediction sets stay in the served model's
numpy code (`cnnlab.serving.onnx_pyfunc`), so one graph serves every setting evaluate chooses.

Exporter: `torch.onnx.export`'s TorchScript exporter (``dynamo=False``) at opset 18. It gives a
correct graph for every net of the zoo and every offline backbone (tests/test_onnx_export.py runs
each one), needs only the ``onnx`` package, and takes about a second for an EfficientNet; the
dynamo exporter needs onnxscript in addition, which this project does not install. One op gets
its own symbolic: adaptive average pooling to a size that does not divide its input (vgg16's 7x7
pool under 224 px), which the stock one refuses, becomes two MatMuls (`_adaptive_avg_pool2d`).

A graph is only served after `check_parity`: on real images (register uses the test split) its
probabilities must equal the PyTorch model's within ``tolerance`` and its top class must be the
same, or the stage stops with the image's index and the difference.
"""

from __future__ import annotations

import io
import shutil
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab.models.classifier import Classifier, ModelSpec
from cnnlab.serving.onnx_pyfunc import softmax
from cnnlab.utils.files import atomic_write

OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# Largest difference allowed between the two runtimes' probabilities: fp32 kernels summing in
# another order differ by about 1e-6; a wrong graph differs by far more.
TOLERANCE = 1e-4


class ParityError(RuntimeError):
    """The exported graph does not answer like the PyTorch model."""


@dataclass(frozen=True)
class Parity:
    images: int  # how many were compared
    max_abs_diff: float  # over every image and class, between the two runtimes' probabilities
    worst_image: int  # index of the image where it occurred


def export_onnx(model: Classifier, spec: ModelSpec, path: Path, *, opset: int = OPSET) -> None:
    """Write ``model`` (eval mode, CPU, fp32) to ``path`` as an ONNX graph, atomically."""
    import onnx

    model = model.eval().cpu().float()
    example = torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size, dtype=torch.uint8)
    buffer = io.BytesIO()
    torch.onnx.register_custom_op_symbolic("aten::adaptive_avg_pool2d", _adaptive_avg_pool2d, opset)
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter announces its own deprecation; it is the one chosen above.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            torch.onnx.export(model, (example,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=opset, dynamo=False, do_constant_folding=True)
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::adaptive_avg_pool2d", opset)
    graph = onnx.load_model_from_string(buffer.getvalue())
    onnx.checker.check_model(graph, full_check=True)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def _adaptive_avg_pool2d(g, x, output_size):  # a TorchScript-exporter symbolic: g is its graph context
    """aten::adaptive_avg_pool2d for any static size. The stock symbolic refuses an output size that
    does not divide the input (vgg16's 7x7 pool under 224 px: 2x2 at 64 px, 4x4 at 128); there the
    pool is two MatMuls with constant matrices averaging PyTorch's windows. Other cases: stock."""
    from torch.onnx import symbolic_helper, symbolic_opset9

    hw = (symbolic_helper._get_tensor_sizes(x) or [])[2:]
    out = symbolic_helper._maybe_get_const(output_size, "is")
    if len(hw) != 2 or None in hw or not isinstance(out, list) or all(s % o == 0 for s, o in zip(hw, out)):
        return symbolic_opset9.adaptive_avg_pool2d(g, x, output_size)
    rows, cols = (_window_means(s, o) for s, o in zip(hw, out))
    x = g.op("MatMul", x, g.op("Constant", value_t=cols.T.contiguous()))  # (N, C, H, W) -> (N, C, H, out_w)
    return g.op("MatMul", g.op("Constant", value_t=rows), x)  # -> (N, C, out_h, out_w)


def _window_means(size: int, out: int) -> torch.Tensor:
    """(out, size): row i averages PyTorch's adaptive window floor(i*size/out) .. ceil((i+1)*size/out)."""
    m = torch.zeros(out, size)
    for i in range(out):
        start, end = i * size // out, -(-(i + 1) * size // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def check_parity(model: Classifier, graph: Path, batches: Iterable[np.ndarray], *, name: str,
                 tolerance: float = TOLERANCE) -> Parity:
    """Compare ``graph`` (ONNX Runtime, CPU) with ``model`` (PyTorch, fp32) on uint8 ``batches``.

    Raises `ParityError` naming ``name``, the image (its index over all batches) and the difference
    where the softmax probabilities differ by more than ``tolerance`` or the top classes differ
    (unless the PyTorch model's two best are within ``tolerance`` of each other: a tie either
    runtime may break its own way).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    model = model.eval().cpu().float()
    seen, worst, worst_at = 0, 0.0, 0
    for batch in batches:
        with torch.inference_mode():
            expected = torch.softmax(model(torch.from_numpy(np.ascontiguousarray(batch))).float(), dim=1).numpy()
        got = softmax(session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch)})[0])
        diff = np.abs(got - expected).max(axis=1)
        if diff.max() > worst:
            worst, worst_at = float(diff.max()), seen + int(diff.argmax())
        if diff.max() > tolerance:
            i = int(diff.argmax())
            raise ParityError(f"{name}: the ONNX graph's probabilities differ from the PyTorch model's by "
                              f"{diff[i]:.3g} on test image {seen + i} (allowed: {tolerance:g}); the export is "
                              "wrong for this network: serve it with `serving.runtime: torch` and report it")
        top2 = np.sort(expected, axis=1)[:, -2:]
        flipped = (got.argmax(axis=1) != expected.argmax(axis=1)) & (top2[:, 1] - top2[:, 0] > tolerance)
        if flipped.any():
            i = int(np.flatnonzero(flipped)[0])
            raise ParityError(f"{name}: the ONNX graph's top class differs from the PyTorch model's on test "
                              f"image {seen + i} ({got[i].argmax()} against {expected[i].argmax()}); serve it "
                              "with `serving.runtime: torch` and report it")
        seen += len(batch)
    if seen == 0:
        raise ParityError(f"{name}: no images to check the ONNX graph on")
    return Parity(images=seen, max_abs_diff=worst, worst_image=worst_at)


def onnx_folder(model: Classifier, spec: ModelSpec, classifier_dir: Path, out: Path) -> Path:
    """``out`` with ``model.onnx`` (``model`` exported) and a copy of ``classifier_dir``'s
    ``spec.json``: what the ONNX pyfunc serves (`cnnlab.serving.onnx_pyfunc`)."""
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, spec, out / "model.onnx")
    shutil.copyfile(classifier_dir / "spec.json", out / "spec.json")
    return out
