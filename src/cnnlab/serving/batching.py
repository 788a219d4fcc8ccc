"""One forward pass for requests that arrive together (the scoring server's worker threads).

MLflow's scoring server runs each request's ``predict`` in a thread of its own (FastAPI +
``asyncio.to_thread``), so under load several threads hold a few decoded images each. Run one
at a time, a small CNN spends most of each pass on per-call overhead, and run at once they fight
over the same cores. `Coalescer` makes the calls take turns: the thread whose turn it is runs
everything queued since the last pass, in one batch, and hands each caller its rows. No thread
waits for company: a lone request runs at once, and batches form only from calls that were already
waiting while the previous pass ran.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Batches are torch tensors (the PyTorch runtime) or numpy arrays (ONNX Runtime): this module
# imports no torch, since the ONNX model's environment has none.
Batch = Any


@dataclass
class _Call:
    inputs: Batch
    output: Batch | None = None
    error: BaseException | None = None
    done: bool = False


class Coalescer:
    """``coalescer(x)`` returns ``fn(x)``; concurrent calls are concatenated along dim 0 into
    passes of at most ``max_rows`` rows (a single call larger than that runs alone). ``x`` is a
    torch tensor or a numpy array, the same kind for every call.

    ``fn`` must treat rows independently (a model in eval mode). Results equal separate calls up to
    floating-point rounding: kernels may sum in another order for another batch size.
    """

    def __init__(self, fn: Callable[[Batch], Batch], max_rows: int = 64) -> None:
        self._fn = fn
        self._max_rows = max_rows
        self._cond = threading.Condition()
        self._queue: list[_Call] = []
        self._busy = False

    def __call__(self, inputs: Batch) -> Batch:
        call = _Call(inputs)
        with self._cond:
            self._queue.append(call)
            while self._busy and not call.done:
                self._cond.wait()
            if call.done:
                return self._result(call)
            self._busy = True
        try:
            while not call.done:  # our turn: run what is queued until our own call is answered
                self._run(self._take())
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
        return self._result(call)

    def _take(self) -> list[_Call]:
        with self._cond:
            batch, rows = [], 0
            while self._queue and (not batch or rows + len(self._queue[0].inputs) <= self._max_rows):
                rows += len(self._queue[0].inputs)
                batch.append(self._queue.pop(0))
            return batch

    def _run(self, batch: list[_Call]) -> None:
        try:
            inputs = batch[0].inputs if len(batch) == 1 else _concat([c.inputs for c in batch])
            outputs = self._fn(inputs)
            start = 0
            for c in batch:
                c.output = outputs[start : start + len(c.inputs)]
                start += len(c.inputs)
        except BaseException as exc:  # every caller of the pass sees the failure, none hangs
            for c in batch:
                c.error = exc
        with self._cond:
            for c in batch:
                c.done = True
            self._cond.notify_all()

    @staticmethod
    def _result(call: _Call) -> Batch:
        if call.error is not None:
            raise call.error
        assert call.output is not None
        return call.output


def _concat(parts: Sequence[Batch]) -> Batch:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch  # only reached with torch tensors, i.e. where torch is installed

    return torch.cat(list(parts))
