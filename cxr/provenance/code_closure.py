"""The code a pipeline step runs, computed: the import closure of its entry module inside ``cxr``,
and a fingerprint of what that code *computes*.

The fingerprint (:func:`fingerprint`) hashes each file's syntax tree with what cannot change a
result taken out: comments (the parser drops them), docstrings, logging calls, the text of raised
errors and command-line help. So a typo fixed in a message reruns no stage, under DVC or Prefect,
while any edit to a statement that computes does. Measured on this repository (issue 18): a comment
added to ``cxr/errors.py`` used to make ``dvc status`` list all nine stages.

Kept apart from the stage registry (:mod:`cxr.stages`) so that a step can fingerprint its own code
(the training run key does) without the registry itself becoming part of every step's code.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import threading
from collections.abc import Iterable, Sequence
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


# CPython 3.11's parser keeps its recursion-depth check per interpreter, not per thread: two threads
# parsing at once fail with "SystemError: AST constructor recursion depth mismatch" (seen when the
# Prefect flow computed two training tasks' cache keys concurrently). Parses are serialised.
_PARSE_LOCK = threading.Lock()


def _parse(source: str, filename: str) -> ast.Module:
    with _PARSE_LOCK:
        return ast.parse(source, filename=filename)


def imported_names(module: str, path: Path) -> list[tuple[str, int]]:
    """Every name the import statements of one file import (at any depth), absolute, with its line.

    ``from cxr.data import kaggle`` yields ``cxr.data`` and ``cxr.data.kaggle`` (the name may be a
    submodule); relative imports are resolved against ``module``'s package.

    Args:
        module: the file's dotted module name.
        path: the file.

    Returns:
        ``(dotted name, line number)`` pairs, in the order of the syntax tree walk.
    """
    tree = _parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            found.append((origin, node.lineno))
            found += [(f"{origin}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _imports(module: str, path: Path) -> frozenset[str]:
    """Modules named by the import statements of one file (at any depth), resolved to ``cxr`` modules."""
    stat = path.stat()
    return _imports_cached(module, str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=512)
def _imports_cached(module: str, path: str, mtime_ns: int, size: int) -> frozenset[str]:
    """:func:`_imports`, cached while the file's modification time and size stay the same: the steps'
    closures share most of their files (``cxr stages --fingerprints`` walked 385 files for 67 before)."""
    return frozenset(name for name, _ in imported_names(module, Path(path)) if _module_file(name) is not None)


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
    seen: dict[str, Path] = {}  # module name -> its file
    todo = [module]
    while todo:
        current = todo.pop()
        parts = current.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            name = ".".join(parts[:i])
            path = None if name in seen else _module_file(name)
            if path is None:
                continue
            seen[name] = path
            todo.extend(_imports(name, path) - seen.keys())
    files = {path.relative_to(REPO_ROOT).as_posix() for path in seen.values()}
    return tuple(sorted(files))


# ---------------------------------------------------------------- what the code computes
_LOGGERS = frozenset({"log", "logger", "logging", "LOG"})
_LOG_METHODS = frozenset({"debug", "info", "warning", "warn", "error", "exception", "critical"})
_TEXT_KEYWORDS = frozenset({"help", "description", "epilog"})


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _is_log_call(node: ast.stmt) -> bool:
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
        return False
    func = node.value.func
    return (
        isinstance(func, ast.Attribute)
        and func.attr in _LOG_METHODS
        and isinstance(func.value, ast.Name)
        and func.value.id in _LOGGERS
    )


class _Normaliser(ast.NodeTransformer):
    """Drop docstrings and logging statements, blank error-message text, drop help keywords."""

    def _body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        if body and _is_docstring(body[0]):
            body = body[1:]
        body = [stmt for stmt in body if not _is_log_call(stmt)]
        return body or [ast.Pass()]

    def generic_visit(self, node: ast.AST) -> ast.AST:
        node = super().generic_visit(node)
        for name in ("body", "orelse", "finalbody"):
            value = getattr(node, name, None)
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                setattr(node, name, self._body(value) if name == "body" else [s for s in value if not _is_log_call(s)])
        return node

    def visit_Raise(self, node: ast.Raise) -> ast.AST:
        for child in ast.walk(node):  # the message a raised error carries does not change a result
            for field, value in ast.iter_fields(child):
                if isinstance(value, ast.JoinedStr):
                    setattr(child, field, ast.Constant(""))
                elif isinstance(value, list):
                    setattr(child, field, [ast.Constant("") if isinstance(v, ast.JoinedStr) else v for v in value])
            if isinstance(child, ast.Constant) and isinstance(child.value, str):
                child.value = ""
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        node.keywords = [k for k in node.keywords if k.arg not in _TEXT_KEYWORDS]
        return self.generic_visit(node)


def normalised_tree(source: str, filename: str = "<source>", drop_functions: Sequence[str] = ()) -> str:
    """A Python file's syntax tree without comments, docstrings, logging, error text or help text.

    Args:
        source: the file's text.
        filename: for syntax errors.
        drop_functions: top-level functions to leave out (another CLI command's handler, say).

    Returns:
        ``ast.dump`` of the normalised tree (no line numbers): equal for two sources that compute alike.
    """
    tree = _parse(source, filename)
    tree.body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name in drop_functions)]
    return ast.dump(_Normaliser().visit(tree), include_attributes=False)


def file_fingerprint(rel: str, drop_functions: Sequence[str] = ()) -> bytes:
    """What one repository file contributes to a fingerprint: the normalised tree of a ``.py`` file,
    the bytes of anything else (a template)."""
    path = REPO_ROOT / rel
    return source_fingerprint(path, drop_functions) if path.suffix == ".py" else path.read_bytes()


def source_fingerprint(path: Path, drop_functions: Sequence[str] = ()) -> bytes:
    """:func:`normalised_tree` of a Python file, cached while its modification time and size stay the same."""
    stat = path.stat()
    return _normalised_file(str(path), stat.st_mtime_ns, stat.st_size, tuple(drop_functions))


@functools.lru_cache(maxsize=512)
def _normalised_file(path: str, mtime_ns: int, size: int, drop_functions: tuple[str, ...]) -> bytes:
    """The normalised tree of one file, cached while its modification time and size stay the same."""
    return normalised_tree(Path(path).read_text(), path, drop_functions).encode()


def fingerprint(files: Iterable[str], partial: Iterable[tuple[str, Sequence[str]]] = ()) -> str:
    """sha256 of what the given files compute (see the module docstring).

    Args:
        files: repository-relative paths, fingerprinted whole.
        partial: ``(path, functions to leave out)`` pairs: files of which only a part belongs to a
            step (``cxr/cli.py`` less the other commands' handlers).

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.encode() + b"\0" + file_fingerprint(rel) + b"\0")
    for rel, dropped in partial:
        digest.update(rel.encode() + b"\0" + file_fingerprint(rel, dropped) + b"\0")
    return digest.hexdigest()


def module_fingerprint(module: str) -> str:
    """:func:`fingerprint` of the import closure of ``module``.

    Args:
        module: a dotted ``cxr`` module name.

    Returns:
        The hex digest.
    """
    return fingerprint(import_closure(module))
