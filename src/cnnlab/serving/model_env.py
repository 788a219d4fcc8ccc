"""The pip requirements a logged model needs where MLflow rebuilds its environment.

`mlflow models serve` / `predict` without ``--env-manager local``, `build-docker` and serving
platforms install the model's ``requirements.txt`` into an empty environment and nothing else,
so it has to name every distribution the shipped code imports on its way to a prediction. A
hand-kept list cannot keep up with that (it once lacked timm, so no transfer model loaded).

The list is derived from the code itself, in two parts that together are what loading and
predicting runs:

* statically, the module-level imports of the entry file and of every module of the shipped
  package they reach (these run whenever the module is imported, so reading them is exact);
* dynamically, the imports that the package's code makes while a given callable loads the
  model and predicts (`exercise`): the lazy ones inside functions, e.g. ``import timm`` when a
  transfer model builds its backbone. A scratch model never reaches that line, so its
  environment goes without timm.

Both are done in this process: a fresh interpreter would cost a second torch + MLflow import at
every logging, and could not build a model whose kind only this process registered. Only the
distributions the package imports directly are named, each pinned to its installed version;
what they depend on in turn is theirs to declare (as MLflow's own inference does it).
"""

from __future__ import annotations

import ast
import builtins
import importlib.util
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib.metadata import (
    PackageNotFoundError,
    distribution,
    packages_distributions,
)
from pathlib import Path

# Needed by MLflow's scoring server itself (FastAPI, uvicorn), not imported by the model's code.
# mlflow-skinny has it, and the pyfunc loader: the full mlflow adds the tracking server, its UI and
# their dependencies (SQLAlchemy, Flask, matplotlib, scikit-learn, ...), about 400 MB a serving
# environment does not use. So the ``mlflow`` import name is served by mlflow-skinny too.
SERVER_REQUIREMENTS = ("mlflow-skinny",)
_SERVED_BY = {"mlflow": "mlflow-skinny"}
_REQUIREMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class UnresolvedImportError(RuntimeError):
    """The model's code imports a name that no installed distribution provides."""


def served_requirements(
    entry_point: Path,
    package_dir: Path,
    exercise: Callable[[], object],
    server: Sequence[str] = SERVER_REQUIREMENTS,
) -> list[str]:
    """Pinned requirements (``name==version``, sorted) for a model whose code is ``package_dir``.

    ``entry_point`` is the file MLflow runs to build the model; ``exercise`` must load the model
    and predict the way serving does (its exceptions propagate: a model that cannot predict on
    its own example is not fit to log). ``server`` names distributions needed on top.
    """
    package = package_dir.name
    with _recording_imports(package) as traced:
        exercise()
    reached = _reached_modules(entry_point, package_dir, {m for m in traced if _top(m) == package})
    names = {_top(m) for m in traced} | {
        _top(m) for source in reached for m in _module_level_imports(source, package_dir)
    }
    names = {n for n in names if n != package and n not in sys.stdlib_module_names}
    providers = packages_distributions()  # reads every installed RECORD: once, not per name
    wanted = {d for name in names for d in _distributions_for(name, providers)} | set(server)
    return sorted({_pin(name) for name in wanted}, key=str.lower)


@contextmanager
def _recording_imports(package: str) -> Iterator[set[str]]:
    """Absolute names imported by code of ``package`` while active (``from a import b``: a and
    a.b, whether b is a module or not; the caller filters). Every import statement goes through
    `builtins.__import__`, even of a module already imported, so lazy imports are seen on every
    run, not only on the first."""
    seen: set[str] = set()
    original = builtins.__import__

    def recording(name: str, globals: dict | None = None, locals: dict | None = None,
                  fromlist: Sequence[str] | None = (), level: int = 0) -> object:
        importer = str((globals or {}).get("__name__") or "")
        if importer == package or importer.startswith(package + "."):
            absolute = importlib.util.resolve_name("." * level + name, globals.get("__package__")) if level else name
            seen.add(absolute)
            seen.update(f"{absolute}.{item}" for item in fromlist or () if item != "*")
        return original(name, globals, locals, fromlist, level)

    builtins.__import__ = recording
    try:
        yield seen
    finally:
        builtins.__import__ = original


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def _module_file(module: str, package_dir: Path) -> Path | None:
    """Source of a module of the shipped package (a package is its __init__.py), else None."""
    base = package_dir.parent.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _reached_modules(entry_point: Path, package_dir: Path, traced: set[str]) -> list[Path]:
    """Source files of the entry point and of every package module it or ``traced`` brings in
    (importing a.b.c runs a/__init__.py and a/b/__init__.py first)."""
    files, todo, seen = [entry_point], sorted(traced), set()
    todo += [m for m in _module_level_imports(entry_point, package_dir) if _top(m) == package_dir.name]
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            path = _module_file(name, package_dir)
            if name in seen or path is None:  # None: a name defined in a module, not a module
                continue
            seen.add(name)
            files.append(path)
            todo += [m for m in _module_level_imports(path, package_dir) if _top(m) == package_dir.name]
    return files


def _module_level_imports(source: Path, package_dir: Path) -> list[str]:
    """Absolute names that importing ``source`` imports: not those inside functions (they run
    only when called, and the trace sees those) nor under ``if TYPE_CHECKING:`` (never run)."""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    current = _module_name(source, package_dir)
    out: list[str] = []
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = importlib.util.resolve_name("." * node.level + base, _package_of(current, source))
            out += [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
        stack.extend(ast.iter_child_nodes(node))
    return out


def _module_name(source: Path, package_dir: Path) -> str | None:
    """Dotted name of a file inside the package; None for a file outside it (the entry point,
    once MLflow has copied it out of the package)."""
    try:
        rel = source.resolve().relative_to(package_dir.parent.resolve()).with_suffix("")
    except ValueError:
        return None
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _package_of(current: str | None, source: Path) -> str:
    if current is None:
        raise UnresolvedImportError(f"{source}: a relative import outside the shipped package")
    return current if source.name == "__init__.py" else current.rpartition(".")[0]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _distributions_for(import_name: str, providers: Mapping[str, list[str]]) -> list[str]:
    """The PyPI name that provides ``import_name`` (PIL: pillow, yaml: PyYAML). Where several do,
    the one `_SERVED_BY` names (mlflow: mlflow-skinny), else the one the others are dependencies of; all
    of those left where none is (a namespace such as ``google``: naming one too many is safe)."""
    candidates = sorted(set(providers.get(import_name, [])))
    if _SERVED_BY.get(import_name) in candidates:
        return [_SERVED_BY[import_name]]
    if not candidates:
        raise UnresolvedImportError(
            f"the model's code imports {import_name!r}, which no installed distribution provides,"
            " so its serving environment could not install it"
        )
    required = {_normalize(r) for c in candidates for r in _requires(c)}
    return [c for c in candidates if _normalize(c) not in required] or candidates


def _requires(name: str) -> list[str]:
    """Unconditional requirement names of ``name`` (extras are not installed by default)."""
    out = []
    for req in distribution(name).requires or []:
        match = _REQUIREMENT_NAME.match(req)
        if match and "extra" not in req.partition(";")[2]:
            out.append(match.group(0))
    return out


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pin(name: str) -> str:
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        raise UnresolvedImportError(f"{name} is needed to serve the model but is not installed") from None
    # Drop a local tag ("2.x+cpu"): PyPI has no such release, so the pin would not resolve.
    return f"{dist.metadata['Name']}=={dist.version.split('+')[0]}"
