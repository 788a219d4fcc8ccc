"""dvc.yaml's code dependencies, checked against the imports themselves so that they cannot drift.

A stage re-runs only when a listed dependency changes, so a module it runs but does not list can
change its outputs without DVC noticing. For every stage this follows the imports of its
pipeline script, statically (`ast`, nothing is imported), through the cnnlab package, and
checks that every file reached is a listed dependency or lies in a listed folder.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator

import pytest
import yaml

from conftest import REPO

SRC = REPO / "src"
COMMON = "pipeline/_common.py"
# Not a dependency on purpose (see dvc.yaml's header): every key has its value in params.yaml
# (tests/test_config.py checks it), so config.py's defaults never decide an output, and the
# params a stage reads are dependencies through its `params:` list.
NOT_DEPENDENCIES = {"src/cnnlab/config.py"}


def _from_params(template: str, params: dict) -> object:
    """The params.yaml value a ``${a.b}`` template names."""
    value = params
    for key in re.fullmatch(r"\$\{(.+)\}", template).group(1).split("."):
        value = value[key]
    return value


def _stages() -> Iterator[tuple[str, dict, str]]:
    """(name, definition, indent of its deps' items); a foreach stage once, named by every item
    (their deps differ only in templated entries, which are data, not code)."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for name, stage in dvc["stages"].items():
        if "foreach" in stage:
            items = stage["foreach"]
            items = _from_params(items, params) if isinstance(items, str) else items
            keys = list(items) if isinstance(items, dict) else [str(i) for i in items]
            yield ", ".join(f"{name}@{k}" for k in keys), stage["do"], " " * 8
        else:
            yield name, stage, " " * 6


def _script(stage: dict) -> str:
    match = re.search(r"\bpython\s+(pipeline/\w+\.py)\b", " ".join(stage["cmd"].split()))
    assert match, f"no `python pipeline/<script>.py` in cmd: {stage['cmd']!r}"
    return match.group(1)


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(nodes: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import in ``nodes``, nested ones (in functions, try, if) included; ``if
    TYPE_CHECKING:`` blocks are skipped: they never run, so they cannot change an output."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            stack.extend(getattr(node, "orelse", []))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _module_file(module: str) -> str | None:
    """Repo-relative file of a cnnlab module (a package is its __init__.py), None if not one."""
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(REPO).as_posix()
    return None


def _with_parents(module: str) -> list[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _cnnlab_modules(node: ast.Import | ast.ImportFrom, current: str | None) -> list[str]:
    """The cnnlab modules one import statement runs; ``current`` is the importing module's name."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importing module's package
            assert current, f"relative import outside the cnnlab package: {ast.unparse(node)}"
            package = current.split(".")
            if not _module_file(current).endswith("__init__.py"):
                package = package[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, *([base] if base else [])])
        # `from a import b` runs a, and b too when b is a submodule rather than a name in a.
        names = [base] + [f"{base}.{alias.name}" for alias in node.names
                          if _module_file(f"{base}.{alias.name}") is not None]
    return [m for name in names if name.split(".")[0] == "cnnlab" for m in _with_parents(name)]


def _common_nodes(script_tree: ast.Module) -> list[ast.stmt]:
    """The parts of _common.py a script runs: its top level, plus the bodies of the functions the
    script imports (and of the _common functions those call). _common imports what one stage
    needs inside that stage's helper, so that the other stages do not depend on it."""
    tree = ast.parse((REPO / COMMON).read_text(encoding="utf-8"))
    functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    wanted: set[str] = set()
    for node in ast.walk(script_tree):
        if isinstance(node, ast.ImportFrom) and node.module == "_common" and not node.level:
            wanted |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Import) and any(alias.name == "_common" for alias in node.names):
            wanted |= set(functions)  # `_common.anything`: all of it
    todo, seen = [n for n in wanted if n in functions], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [n.id for n in ast.walk(functions[name]) if isinstance(n, ast.Name) and n.id in functions]
    return [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))] + [
        functions[name] for name in sorted(seen)
    ]


def _imports_common(tree: ast.Module) -> bool:
    return any(
        (isinstance(n, ast.ImportFrom) and n.module == "_common")
        or (isinstance(n, ast.Import) and any(a.name == "_common" for a in n.names))
        for n in ast.walk(tree)
    )


def code_closure(script: str) -> set[str]:
    """Repo-relative files of every cnnlab module ``script`` imports, directly or through others."""
    tree = ast.parse((REPO / script).read_text(encoding="utf-8"))
    todo: list[tuple[list[ast.stmt], str | None]] = [(tree.body, None)]
    if _imports_common(tree):
        todo.append((_common_nodes(tree), None))
    files: set[str] = set()
    seen: set[str] = set()
    while todo:
        nodes, current = todo.pop()
        for node in _imports(nodes):
            for module in _cnnlab_modules(node, current):
                if module in seen:
                    continue
                seen.add(module)
                path = _module_file(module)
                assert path, f"{script} imports {module} (via {ast.unparse(node)}), which is not in src/"
                files.add(path)
                todo.append((ast.parse((REPO / path).read_text(encoding="utf-8")).body, module))
    return files


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_every_stage_lists_the_code_it_runs():
    missing = {}
    for name, stage, indent in _stages():
        deps = [d for d in stage.get("deps", []) if isinstance(d, str) and "${" not in d]
        script = _script(stage)
        tree = ast.parse((REPO / script).read_text(encoding="utf-8"))
        needed = {script} | ({COMMON} if _imports_common(tree) else set()) | code_closure(script)
        absent = sorted(p for p in needed - NOT_DEPENDENCIES if not _covered(p, deps))
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
        for name, stage, _ in _stages()
    }
    stale = {name: paths for name, paths in stale.items() if paths}
    assert not stale, f"dvc.yaml lists code that is not there: {stale}"


def test_evaluate_and_register_depend_only_on_what_every_variant_set_has():
    """DVC refuses a missing dependency, and a params.yaml may declare no feature_extract variant
    (bench/architectures.yaml does not): so no dependency on data/features, or on one variant."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    always = {"data/split", "data/models", "data/metrics/evaluate.json"}
    for name in ("evaluate", "register"):
        data = [d for d in dvc["stages"][name]["deps"] if not d.startswith(("pipeline/", "src/"))]
        assert set(data) <= always, (name, sorted(set(data) - always))
