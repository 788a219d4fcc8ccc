"""`Coalescer`: concurrent calls share passes and each gets exactly its own rows back."""

from __future__ import annotations

import threading

import pytest
import torch

from cnnlab.serving.batching import Coalescer


class _Gated:
    """fn for a Coalescer: records each pass's rows; the first pass waits until released, so the
    calls made meanwhile must queue up behind it."""

    def __init__(self, fail_on: float | None = None) -> None:
        self.passes: list[list[float]] = []
        self.first_started, self.release = threading.Event(), threading.Event()
        self.fail_on = fail_on

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.passes.append(x[:, 0].tolist())
        if len(self.passes) == 1:
            self.first_started.set()
            assert self.release.wait(60)
        if self.fail_on is not None and self.fail_on in x[:, 0].tolist():
            raise RuntimeError("boom")
        return x * 10


def _call_in_threads(coalescer: Coalescer, inputs: list[torch.Tensor], gate: _Gated) -> list[object]:
    results: list[object] = [None] * len(inputs)

    def call(i: int) -> None:
        try:
            results[i] = coalescer(inputs[i])
        except RuntimeError as exc:
            results[i] = exc

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert gate.first_started.wait(60)
    others = [threading.Thread(target=call, args=(i,)) for i in range(1, len(inputs))]
    for t in others:
        t.start()
    while len(coalescer._queue) < len(inputs) - 1:  # every other call is waiting for its turn
        threading.Event().wait(0.01)
    gate.release.set()
    for t in [first, *others]:
        t.join(60)
    return results


def _each_gets_its_own_rows(max_rows: int, rows: list[int], width: int) -> tuple[_Gated, list[torch.Tensor]]:
    """Calls of ``rows`` rows each (call i filled with i), one per thread, through a Coalescer of
    ``max_rows``: every call must get back its own rows, times 10. Returns the gate's passes' record."""
    gate = _Gated()
    inputs = [torch.full((n, width), float(i)) for i, n in enumerate(rows, start=1)]
    results = _call_in_threads(Coalescer(gate, max_rows=max_rows), inputs, gate)
    for x, y in zip(inputs, results):
        assert torch.equal(y, x * 10)
    return gate, inputs


def test_calls_that_wait_during_a_pass_run_together_and_each_gets_its_own_rows():
    gate, inputs = _each_gets_its_own_rows(64, [1, 3, 1, 16, 2], width=2)
    assert gate.passes[0] == [1.0]
    assert sorted(gate.passes[1]) == sorted(v for x in inputs[1:] for v in x[:, 0].tolist())  # one pass
    assert len(gate.passes) == 2


def test_passes_hold_at_most_max_rows_but_a_bigger_call_runs_alone():
    gate, _ = _each_gets_its_own_rows(4, [1, 3, 2, 9, 1], width=1)
    assert [4.0] * 9 in gate.passes  # the 9-row call, alone
    assert all(len(p) <= 4 for p in gate.passes if p != [4.0] * 9)


def test_a_failing_pass_fails_its_callers_only_and_the_next_calls_work():
    gate = _Gated(fail_on=3.0)
    coalescer = Coalescer(gate, max_rows=64)
    inputs = [torch.full((1, 1), float(i)) for i in (1, 2, 3)]
    results = _call_in_threads(coalescer, inputs, gate)
    assert torch.equal(results[0], inputs[0] * 10)
    assert all(isinstance(r, RuntimeError) for r in results[1:])  # 2 and 3 shared the failing pass
    assert torch.equal(coalescer(torch.ones(2, 1)), torch.ones(2, 1) * 10)
    with pytest.raises(RuntimeError):
        coalescer(torch.full((1, 1), 3.0))
