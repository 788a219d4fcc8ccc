"""Stage `register`: every declared variant becomes a version of one registered model; the alias
(`champion`) goes to the best validation accuracy."""

from __future__ import annotations

from pathlib import Path

from _common import parse, run

from cnnlab.registry import RegistryError
from cnnlab.stages.register import register


def main() -> None:
    args, params = parse(__doc__, "models", "test_metrics", "out")
    print(register(Path(args.models), Path(args.test_metrics), Path(args.out),
                   stages={name: v.stage for name, v in params.resolved_variants().items()},
                   model_name=params.registry.model_name, alias=params.registry.alias), end="")


if __name__ == "__main__":
    run(main, RegistryError, FileNotFoundError)
