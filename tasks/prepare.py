"""Prefect task for the ``prepare`` step (wraps :func:`cxr.data.prepare.prepare`)."""

from __future__ import annotations

from typing import Any

from prefect import task

from cxr.data.prepare import prepare
from tasks.caching import ContentPolicy

PREPARE_CODE = ("cxr/data/prepare.py", "cxr/data/manifest.py", "cxr/data/images.py", "cxr/data/split.py", "cxr/reporting/plots.py")


@task(name="prepare", cache_policy=ContentPolicy(code=PREPARE_CODE, path_inputs=("raw_dir",)),
      persist_result=True)
def prepare_task(raw_dir: str, split_params: dict[str, Any], prepare_params: dict[str, Any],
                 prepared_dir: str = "data/prepared", reports_dir: str = "reports") -> dict[str, Any]:
    """Manifest, quality report, split and plot; keyed on the content of ``raw_dir``."""
    return prepare(raw_dir, split_params, prepare_params, prepared_dir=prepared_dir,
                   reports_dir=reports_dir)
