"""The code a pipeline step runs, computed: the import closure of its entry module inside ``cxr``.

Kept apart from the stage registry (:mod:`cxr.stages`) so that a step can digest its own code (the
training run key does) without the registry itself becoming part of every step's code.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path

from cxr.errors import CxrError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
REPO_ROOT = PACKAGE_ROOT.parent


def _module_file(module: str) -> Path | None:
    """The source file of a ``cxr`` module or package, or None outside the project."""
    parts = module.split(".")
    if parts[0] != "cxr":
        return None
    base = REPO_ROOT.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(module: str, path: Path) -> set[str]:
    """Modules named by the import statements of one file (at any depth), resolved to ``cxr`` modules."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            found.add(origin)
            found.update(f"{origin}.{alias.name}" for alias in node.names)  # `from cxr.data import kaggle`
    return {m for m in found if _module_file(m) is not None}


@functools.cache
def import_closure(module: str) -> tuple[str, ...]:
    """Every project file that importing (and running) ``module`` executes, as sorted relative paths.

    Args:
        module: a dotted ``cxr`` module name.

    Returns:
        Repository-relative POSIX paths, the module's own file and its parent packages' ``__init__.py`` included.
    """
    if _module_file(module) is None:
        raise CxrError(f"{module}: not a module of the cxr package")
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        parts = current.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            name = ".".join(parts[:i])
            if name in seen or _module_file(name) is None:
                continue
            seen.add(name)
            todo.extend(_imports(name, _module_file(name)) - seen)
    files = {_module_file(m).relative_to(REPO_ROOT).as_posix() for m in seen}
    return tuple(sorted(files))


def files_digest(files: Iterable[str]) -> str:
    """sha256 over the names and contents of repository-relative files.

    Args:
        files: repository-relative paths.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    for rel in files:
        digest.update(rel.encode() + b"\0" + (REPO_ROOT / rel).read_bytes() + b"\0")
    return digest.hexdigest()


def module_digest(module: str) -> str:
    """sha256 over the import closure of ``module`` (what running it executes).

    Args:
        module: a dotted ``cxr`` module name.

    Returns:
        The hex digest.
    """
    return files_digest(import_closure(module))
