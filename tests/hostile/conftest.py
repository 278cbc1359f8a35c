"""Fixtures of the hostile corpus (the session's ``trained`` project comes from ``tests/conftest.py``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def project(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the small trained project (model, card, reports, lineage log), free to break."""
    root = tmp_path / "project"
    shutil.copytree(trained, root)
    return root
