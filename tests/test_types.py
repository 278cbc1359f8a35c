"""The type checker: ``mypy`` on ``cxr/``, ``flows/`` and ``tasks/`` (``[tool.mypy]`` in ``pyproject.toml``).

It runs as a test so that pytest-xdist schedules it beside the others: alone before the suite it held
CI's critical path for 23 s with a cold cache on one of the two cores (it is single-threaded).
``mypy`` with no arguments from the repository root runs the same check by hand.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.factories import REPO_ROOT


@pytest.mark.slow
def test_mypy_finds_no_errors_in_the_packages() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, f"mypy found errors:\n{proc.stdout}{proc.stderr}"
    assert proc.stdout.startswith("Success: no issues found in "), proc.stdout
