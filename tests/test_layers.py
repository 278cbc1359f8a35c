"""Imports between the subpackages of ``cxr`` only point down, and there are no cycles.

Every ``import`` is read with :mod:`ast`, those inside functions included (they run when the
function does). A module belongs to a *unit*: its subpackage (``cxr.training``...), or itself for a
top-level module. Units are ranked below; a unit may import its own rank or lower ones only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cxr.provenance.code_closure import imported_names

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cxr"

# Lowest first. The foundation modules import no subpackage; common holds what several steps share
# (preprocessing, custom layers, metrics and thresholds, the model card, plots); provenance (hashes,
# lineage, audit: it reads cards) above it; the steps follow in the order the pipeline runs them
# (inference below training: the ensemble loads its members); the CLI and the stage registry on top.
FOUNDATION = (
    "cxr",
    "cxr.errors",
    "cxr.safe_text",
    "cxr.formatting",
    "cxr.files",
    "cxr.logs",
    "cxr.runtime",
    "cxr.workspace",
    "cxr.locks",
    "cxr.model_options",
    "cxr.config",
)
RANKS: list[tuple[str, ...]] = [
    FOUNDATION,
    ("cxr.common",),
    ("cxr.provenance",),
    ("cxr.data",),
    ("cxr.inference",),
    ("cxr.training",),
    ("cxr.evaluation",),
    ("cxr.reporting",),
    ("cxr.serving",),
    ("cxr.stages", "cxr.cli", "cxr.models_cli", "cxr.__main__"),
]
RANK = {unit: i for i, units in enumerate(RANKS) for unit in units}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """``cxr.training.train`` → ``cxr.training``; ``cxr.config`` → ``cxr.config``; ``cxr`` → ``cxr``."""
    parts = module.split(".")
    if len(parts) >= 2 and (PACKAGE / parts[1]).is_dir():
        return ".".join(parts[:2])
    return ".".join(parts[:2]) if len(parts) >= 2 else "cxr"


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """``cxr`` modules named by a file's import statements at any depth, with their line numbers."""
    found = imported_names(_module_name(path), path)
    return [(m, line) for m, line in found if m == "cxr" or (m.startswith("cxr.") and _exists(m))]


def _exists(module: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def upward_imports(root: Path = PACKAGE) -> list[str]:
    """``file:line: unit → higher unit`` for every import that climbs the ranks."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        source = unit_of(_module_name(path))
        for target_module, line in imported_modules(path):
            target = unit_of(target_module)
            if target not in RANK:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {target} has no rank in tests/test_layers.py")
            elif source in RANK and RANK[target] > RANK[source]:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {source} imports {target_module} (above it)")
    return problems


def test_every_unit_has_a_rank() -> None:
    units = {unit_of(_module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units - set(RANK) == set(), "rank the new unit in RANKS"


def test_no_import_climbs_the_layers() -> None:
    assert upward_imports() == []


def test_the_guard_sees_imports_inside_functions(tmp_path: Path) -> None:
    """The check is not vacuous: an import hidden in a function body of a lower layer is caught."""
    bad = PACKAGE / "common" / "_layer_probe_tmp.py"
    bad.write_text("def f():\n    from cxr.training import train  # noqa\n    return train\n")
    try:
        problems = upward_imports()
    finally:
        bad.unlink()
    assert any("_layer_probe_tmp.py:2" in p and "cxr.training" in p for p in problems)


@pytest.mark.parametrize("forbidden", ["prefect", "dvc"])
def test_the_domain_package_never_imports_the_orchestrators(forbidden: str) -> None:
    hits = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            hits += [f"{path}:{node.lineno}" for n in names if n.split(".")[0] == forbidden]
    assert hits == []
