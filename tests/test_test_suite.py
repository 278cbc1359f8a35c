"""The test suite's own structure: test modules share code only through ``tests/factories.py`` (plain
builders) and ``tests/conftest.py`` (fixtures, which pytest injects); none imports another test module
or ``conftest``, so each can be run, moved or deleted on its own."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_test_module(name: str) -> bool:
    """``tests.test_x``, ``test_x``, ``tests.conftest`` or ``conftest`` (and anything inside them)."""
    parts = name.split(".")
    if parts[0] == "tests":
        parts = parts[1:]
    return bool(parts) and (parts[0] == "conftest" or parts[0].startswith("test_"))


def forbidden_imports(source: str) -> list[str]:
    """The imports in ``source`` that reach a test module or conftest: ``"line: module"`` each."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: {a.name}" for a in node.names if _is_test_module(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import test_x`, `from .conftest import y`
                names = [node.module] if node.module else [a.name for a in node.names]
            elif node.module == "tests":  # `from tests import test_x, conftest`
                names = [a.name for a in node.names]
            else:
                names = [node.module or ""]
            found += [f"{node.lineno}: {'.' * node.level}{n}" for n in names if _is_test_module(n)]
    return found


FORBIDDEN = [
    "from tests.test_predict_evaluate import chdir",
    "from tests.conftest import REPO_ROOT",
    "import tests.test_dicom",
    "import tests.conftest as c",
    "from tests import test_dicom",
    "from tests import conftest",
    "from test_dicom import write_dicom",
    "from conftest import write_image",
    "import conftest",
    "from . import test_dicom",
    "from .conftest import write_image",
    "def f():\n    from tests.test_dicom import write_dicom\n",
]
ALLOWED = [
    "from tests.factories import chdir, write_image",
    "import tests.factories",
    "from tests import factories",
    "from kaggle_standin import KaggleStandIn",
    "from cxr.evaluation.explain import select",
    "import pytest",
]


def test_the_check_catches_each_form_of_a_test_module_import_and_allows_the_rest():
    assert [source for source in FORBIDDEN if not forbidden_imports(source)] == []
    assert [source for source in ALLOWED if forbidden_imports(source)] == []


def test_no_test_module_imports_another_test_module_or_conftest():
    modules = sorted(TESTS.glob("test_*.py"))
    assert len(modules) > 10, f"no test modules found under {TESTS}"
    offending = {p.name: hits for p in modules if (hits := forbidden_imports(p.read_text(encoding="utf-8")))}
    assert offending == {}, (
        "test modules must share code through tests/factories.py (builders) or conftest.py fixtures, "
        f"not by importing each other or conftest: {offending}"
    )


CAPTURE_CASE = """
def test_first_imports_absl():
    import absl.logging  # TensorFlow's import does this: a handler on the captured stderr


def test_then_first_imports_prefect_under_capsys(capsys):
    from prefect import flow  # Prefect's first logging setup closes the handlers that exist

    print("seen")
    assert capsys.readouterr().out == "seen\\n"


def test_a_later_test_still_has_pytest_s_capture():
    print("still captured")
"""


def test_prefect_s_first_logging_setup_cannot_close_pytest_s_capture(tmp_path):
    """The order pytest-xdist once met: absl's handler, then Prefect's first import in a capsys test.
    Without ``tests/conftest.py``'s early Prefect logging setup this ends in three errors."""
    import os
    import subprocess
    import sys

    (tmp_path / "test_capture_case.py").write_text(CAPTURE_CASE)
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "tests.conftest",
            "test_capture_case.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and "3 passed" in run.stdout, run.stdout + run.stderr


def _module_scoped_fixtures(source: str) -> list[str]:
    """The functions of ``source`` decorated ``@pytest.fixture(scope="module")``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and ast.unparse(deco.func) == "pytest.fixture":
                    scope = {k.arg: k.value for k in deco.keywords}.get("scope")
                    if isinstance(scope, ast.Constant) and scope.value == "module":
                        found.append(node.name)
    return found


def test_the_modules_kept_on_one_worker_each_define_a_module_scoped_fixture(shared_module_fixtures):
    """conftest's scheduler keeps each listed module's tests on one worker so that its module-scoped
    fixture is built once; a listed module without one (renamed, or its fixture gone) is a stale entry."""
    assert _module_scoped_fixtures('@pytest.fixture(scope="module")\ndef f(): pass') == ["f"]
    assert _module_scoped_fixtures("@pytest.fixture\ndef f(): pass") == []
    root = TESTS.parent
    stale = [m for m in shared_module_fixtures if not _module_scoped_fixtures((root / m).read_text(encoding="utf-8"))]
    assert stale == []
