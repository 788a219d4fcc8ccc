"""Reading the package's imports statically (`ast`, nothing is imported): what code each DVC
stage runs, for tests/test_dvc_deps.py (the stages' code dependencies) and tests/test_layout.py
(the package's shape)."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
COMMON = "pipeline/_common.py"
# Not a dependency on purpose (see dvc.yaml's header): every key has its value in params.yaml
# (tests/test_config.py checks it), so config.py's defaults never decide an output, and the
# params a stage reads are dependencies through its `params:` list.
NOT_DEPENDENCIES = {"src/cnnlab/config.py"}


def from_params(template: str, params: dict) -> object:
    """The params.yaml value a ``${a.b}`` template names."""
    value = params
    for key in re.fullmatch(r"\$\{(.+)\}", template).group(1).split("."):
        value = value[key]
    return value


def dvc_stages() -> Iterator[tuple[str, dict, str]]:
    """(name, definition, indent of its deps' items); a foreach stage once, named by every item
    (their deps differ only in templated entries, which are data, not code)."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for name, stage in dvc["stages"].items():
        if "foreach" in stage:
            items = stage["foreach"]
            items = from_params(items, params) if isinstance(items, str) else items
            keys = list(items) if isinstance(items, dict) else [str(i) for i in items]
            yield ", ".join(f"{name}@{k}" for k in keys), stage["do"], " " * 8
        else:
            yield name, stage, " " * 6


def stage_script(stage: dict) -> str:
    match = re.search(r"\bpython\s+(pipeline/\w+\.py)\b", " ".join(stage["cmd"].split()))
    assert match, f"no `python pipeline/<script>.py` in cmd: {stage['cmd']!r}"
    return match.group(1)


def is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imports(nodes: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import in ``nodes``, nested ones (in functions, try, if) included; ``if
    TYPE_CHECKING:`` blocks are skipped: they never run, so they cannot change an output."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if is_type_checking(node):
            stack.extend(getattr(node, "orelse", []))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def module_file(module: str) -> str | None:
    """Repo-relative file of a cnnlab module (a package is its __init__.py), None if not one."""
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(REPO).as_posix()
    return None


def with_parents(module: str) -> list[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def cnnlab_modules(node: ast.Import | ast.ImportFrom, current: str | None) -> list[str]:
    """The cnnlab modules one import statement runs; ``current`` is the importing module's name."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importing module's package
            assert current, f"relative import outside the cnnlab package: {ast.unparse(node)}"
            package = current.split(".")
            if not module_file(current).endswith("__init__.py"):
                package = package[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, *([base] if base else [])])
        # `from a import b` runs a, and b too when b is a submodule rather than a name in a.
        names = [base] + [f"{base}.{alias.name}" for alias in node.names
                          if module_file(f"{base}.{alias.name}") is not None]
    return [m for name in names if name.split(".")[0] == "cnnlab" for m in with_parents(name)]


def common_nodes(script_tree: ast.Module) -> list[ast.stmt]:
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


def imports_common(tree: ast.Module) -> bool:
    return any(
        (isinstance(n, ast.ImportFrom) and n.module == "_common")
        or (isinstance(n, ast.Import) and any(a.name == "_common" for a in n.names))
        for n in ast.walk(tree)
    )


def code_closure(script: str) -> set[str]:
    """Repo-relative files of every cnnlab module ``script`` imports, directly or through others."""
    tree = ast.parse((REPO / script).read_text(encoding="utf-8"))
    todo: list[tuple[list[ast.stmt], str | None]] = [(tree.body, None)]
    if imports_common(tree):
        todo.append((common_nodes(tree), None))
    files: set[str] = set()
    seen: set[str] = set()
    while todo:
        nodes, current = todo.pop()
        for node in imports(nodes):
            for module in cnnlab_modules(node, current):
                if module in seen:
                    continue
                seen.add(module)
                path = module_file(module)
                assert path, f"{script} imports {module} (via {ast.unparse(node)}), which is not in src/"
                files.add(path)
                todo.append((ast.parse((REPO / path).read_text(encoding="utf-8")).body, module))
    return files


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


