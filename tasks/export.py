"""Prefect task for the export stage: portable copies of the shipped models (``cxr export``).

Exporting loads TensorFlow and converts graphs, so it runs ``cxr export`` in a child process like
training (:mod:`tasks.runner`).
"""

from __future__ import annotations

import json
from typing import Any

from prefect import task

from cxr.provenance.hashing import sha256_file
from cxr.workspace import HERE
from tasks.caching import stage_policy
from tasks.runner import run_cxr


@task(name="export", cache_policy=stage_policy("export", path_inputs=("inputs",)), persist_result=True)
def export_task(inputs: list[str], params_path: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Export every shipped model of ``train.models`` in each of ``export.formats``.

    Args:
        inputs: the models folder.
        params_path: the parameters file.
        settings: ``export``, ``train.models``.

    Returns:
        The index of exports and its hash, and the number of exports.
    """
    run_cxr(["export"], params_path, settings)
    index = HERE.exports / "index.json"
    return {
        "index": index.as_posix(),
        "index_sha256": sha256_file(index),
        "exports": len(json.loads(index.read_text(encoding="utf-8"))["exports"]),
    }
