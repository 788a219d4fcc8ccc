"""dvc.yaml's code dependencies, checked against the imports themselves so that they cannot drift.

A stage re-runs only when a listed dependency changes, so a module it runs but does not list can
change its outputs without DVC noticing, and one it lists but does not run re-runs it for nothing.
For every stage this follows the imports of its pipeline script, statically (`ast`, nothing is
imported), through the cnnlab package, and checks both ways: every file reached is a listed
dependency or lies in a listed folder, and every listed piece of code is reached. Code is listed
by subpackage folder (an import inside one needs no dvc.yaml edit), except the stage's own module
and the few top-level modules.
"""

from __future__ import annotations

import ast

import pytest
import yaml

from conftest import REPO
from helpers.imports import (COMMON, NOT_DEPENDENCIES, code_closure, covered, dvc_stages, imports_common,
                             stage_script)


def test_every_stage_lists_the_code_it_runs():
    missing = {}
    for name, stage, indent in dvc_stages():
        deps = [d for d in stage.get("deps", []) if isinstance(d, str) and "${" not in d]
        script = stage_script(stage)
        tree = ast.parse((REPO / script).read_text(encoding="utf-8"))
        needed = {script} | ({COMMON} if imports_common(tree) else set()) | code_closure(script)
        absent = sorted(p for p in needed - NOT_DEPENDENCIES if not covered(p, deps))
        if absent:
            missing[name] = "\n".join(f"{indent}- {p}" for p in absent)
    if missing:
        pytest.fail("dvc.yaml: stages run code they do not list; add it under their `deps:`\n"
                    + "\n".join(f"  {name}:\n{lines}" for name, lines in missing.items()), pytrace=False)


def test_listed_code_exists():
    # A renamed or deleted module left in a list would make `dvc repro` fail on a missing dep.
    stale = {
        name: [d for d in stage.get("deps", []) if isinstance(d, str) and d.startswith(("src/", "pipeline/"))
               and not (REPO / d).exists()]
        for name, stage, _ in dvc_stages()
    }
    stale = {name: paths for name, paths in stale.items() if paths}
    assert not stale, f"dvc.yaml lists code that is not there: {stale}"


def test_evaluate_and_register_depend_only_on_what_every_variant_set_has():
    """DVC refuses a missing dependency, and a params.yaml may declare no feature_extract variant
    (bench/architectures.yaml does not): so no dependency on data/features, or on one variant.
    evaluate writes data/ensembles.json whatever is declared ({} without an ensemble)."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    always = {"data/split", "data/models", "data/metrics/evaluate.json", "data/ensembles.json"}
    for name in ("evaluate", "register"):
        data = [d for d in dvc["stages"][name]["deps"] if not d.startswith(("pipeline/", "src/"))]
        assert set(data) <= always, (name, sorted(set(data) - always))


def _code_deps(stage: dict) -> list[str]:
    return [d for d in stage.get("deps", []) if isinstance(d, str) and d.startswith("src/")]


def test_code_is_listed_by_subpackage_folder():
    """A file inside a subpackage is never listed alone (stages/ excepted: a stage runs its own
    module and the shared skeleton, not its neighbours)."""
    wrong = {}
    for name, stage, _ in dvc_stages():
        for dep in _code_deps(stage):
            parts = dep.split("/")
            folder = len(parts) == 3 and (REPO / dep).is_dir()
            top_file = len(parts) == 3 and dep.endswith(".py")
            stage_file = len(parts) == 4 and parts[2] == "stages" and dep.endswith(".py")
            if not (folder or top_file or stage_file):
                wrong.setdefault(name, []).append(dep)
    assert not wrong, f"list the subpackage folder instead: {wrong}"


def test_every_listed_piece_of_code_is_run():
    """Listing code a stage does not run re-runs it for nothing (e.g. serving code for training)."""
    unused = {}
    for name, stage, _ in dvc_stages():
        script = stage_script(stage)
        needed = code_closure(script)
        idle = [d for d in _code_deps(stage) if not any(covered(p, [d]) for p in needed)]
        if idle:
            unused[name] = idle
    assert not unused, f"dvc.yaml lists code these stages never run: {unused}"


def test_training_never_runs_serving_code():
    """`register` logs the servable model, so editing serving code re-trains nothing."""
    for name, stage, _ in dvc_stages():
        if name.split("@")[0] in ("scratch", "feature_extract", "fine_tune"):
            served = sorted(p for p in code_closure(stage_script(stage)) if p.startswith("src/cnnlab/serving/"))
            assert not served, (name, served)
