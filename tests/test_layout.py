"""The package's shape: subpackages by concern, one module per DVC stage (named as the stage) plus
the shared variant skeleton, and imports that go one way.

Checked statically (`ast`, nothing imported), with the same import reading as test_dvc_deps:
every import counts, the ones inside functions included, since a lazy import is still a
dependency a reader has to follow.
"""

from __future__ import annotations

import ast

import yaml

from conftest import REPO
from helpers.imports import SRC, cnnlab_modules, dvc_stages, imports, module_file, stage_script


def _module_name(path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """cnnlab module -> the cnnlab modules it imports (a package's __init__ stands for the package)."""
    graph = {}
    for path in sorted(SRC.joinpath("cnnlab").rglob("*.py")):
        name = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = {m for node in imports(tree.body) for m in cnnlab_modules(node, name)} - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


SUBPACKAGES = {"data", "models", "training", "evaluation", "tracking", "serving", "cli", "stages", "utils"}
# params.yaml's typed sections sit at the top: every subpackage reads them, and no stage depends on
# the file (every key has its value in params.yaml).
TOP_LEVEL = {"__init__", "__main__", "config"}
SKELETON = "cnnlab.stages.variant"  # the sequence every trainable variant's stage follows


def test_the_package_is_made_of_its_subpackages():
    package = SRC / "cnnlab"
    folders = {p.name for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in package.glob("*.py")}
    assert folders == SUBPACKAGES, folders ^ SUBPACKAGES
    assert modules == TOP_LEVEL, modules ^ TOP_LEVEL


def test_the_library_never_imports_the_team_stack_or_the_benchmarks():
    for path in sorted(SRC.joinpath("cnnlab").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in imports(tree.body):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not [n for n in names if n.split(".")[0] in ("cnnlab_stack", "project_copy", "bench")], (
                path, ast.unparse(node))


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "cnnlab.stages.scratch" in graph and "cnnlab.models.classifier" in graph["cnnlab.stages.scratch"]
    assert _cycles(graph) == []


def test_cycle_finder_finds_one():  # the check above can fail
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_model_registries_are_one_way():
    """The classifier builds from the zoo and the backbones; they never import it (or each other)."""
    graph = import_graph()
    assert {"cnnlab.models.zoo", "cnnlab.models.backbones"} <= graph["cnnlab.models.classifier"]
    for registry in ("cnnlab.models.zoo", "cnnlab.models.backbones"):
        assert not {m for m in graph[registry] if m.startswith("cnnlab.models.")}, (registry, graph[registry])


def test_each_stage_has_its_module_and_its_script_calls_it():
    """dvc.yaml stage `x` (or foreach group `x@...`) -> src/cnnlab/stages/x.py, imported by the
    stage's script; stage modules never import one another, only the shared skeleton."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    graph = import_graph()
    for names, stage, _ in dvc_stages():
        group = names.split("@")[0]
        assert module_file(f"cnnlab.stages.{group}"), f"stage {group}: no src/cnnlab/stages/{group}.py"
        tree = ast.parse((REPO / stage_script(stage)).read_text(encoding="utf-8"))
        imported = {m for node in imports(tree.body) for m in cnnlab_modules(node, None)}
        assert f"cnnlab.stages.{group}" in imported, f"{stage_script(stage)} does not call cnnlab.stages.{group}"
    stages = {f"cnnlab.stages.{name}" for name in dvc["stages"]}
    for module in stages:
        assert not (graph[module] & stages), (module, graph[module] & stages)
    assert SKELETON not in stages and not graph[SKELETON] & stages
    assert {_module_name(p) for p in SRC.joinpath("cnnlab", "stages").glob("*.py")} == stages | {"cnnlab.stages",
                                                                                                  SKELETON}
