"""Stage `register`: every declared variant becomes a version of one registered model; the alias
(`champion`) goes to the best validation accuracy."""

from __future__ import annotations

from pathlib import Path

from _common import parse, run

from cnnlab.serving.onnx_export import ParityError
from cnnlab.stages.register import register
from cnnlab.tracking.model_registry import RegistryError
from cnnlab.tracking.store_errors import store_error


def main() -> None:
    args, params = parse(__doc__, "models", "split", "test_metrics", "ensembles", "out")
    variants = params.resolved_variants()
    print(register(Path(args.models), Path(args.split), Path(args.test_metrics), Path(args.out),
                   stages={name: v.stage for name, v in variants.items() if v.kind != "ensemble"},
                   cfg=params.registry, coverage=params.evaluate.coverage, tta=list(params.evaluate.tta),
                   ensembles={name: v.settings for name, v in variants.items() if v.kind == "ensemble"},
                   ensembles_file=Path(args.ensembles), serving=params.serving), end="")


if __name__ == "__main__":
    run(main, RegistryError, ParityError, FileNotFoundError, explain=store_error)
