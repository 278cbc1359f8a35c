"""The package's shape: no function in ``cxr/`` longer than :data:`MAX_FUNCTION_LINES`.

A function's length is its ``def`` line through its last line, docstring and comments included;
a nested function or a method counts on its own, and inside the function or class that holds it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cxr"
MAX_FUNCTION_LINES = 60


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``file:line name length`` of every function under ``root`` longer than ``limit`` lines, in file order."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append((path.relative_to(root.parent).as_posix(), node.lineno, node.name, length))
    return [f"{file}:{line} {name} {length}" for file, line, name, length in sorted(found)]


def test_no_function_in_the_package_is_longer_than_60_lines() -> None:
    long = long_functions(PACKAGE)
    assert not long, f"{len(long)} function(s) over {MAX_FUNCTION_LINES} lines; split them:\n" + "\n".join(long)


def _function(name: str, lines: int, indent: str = "", is_async: bool = False) -> list[str]:
    """The source of a function ``lines`` long: its def line, a docstring, then assignments."""
    body = [f'{indent}    """Docstring lines count."""'] + [f"{indent}    x{i} = {i}" for i in range(lines - 2)]
    return [f"{indent}{'async ' if is_async else ''}def {name}():", *body]


def test_the_check_counts_from_the_def_line_to_the_last_and_sees_nested_functions(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    source = [
        *_function("fits", 60),  # lines 1-60
        "",
        *_function("too_long", 61, is_async=True),  # lines 62-122
        "",
        "class Holder:",  # line 124
        "    def method(self):",  # line 125: 1 + 61 + 1 = 63 lines
        *_function("inner", 61, indent="        "),  # lines 126-186
        "        return inner",
    ]
    (package / "mod.py").write_text("\n".join(source) + "\n")
    assert long_functions(package) == [
        "pkg/mod.py:62 too_long 61",
        "pkg/mod.py:125 method 63",
        "pkg/mod.py:126 inner 61",
    ]
