"""Prefect task for the ``prepare`` stage (wraps :func:`cxr.data.prepare.prepare`)."""

from __future__ import annotations

from typing import Any

from prefect import task

from cxr.config import InputConfig, PrepareConfig, SplitConfig, parse_section
from cxr.data.prepare import prepare
from tasks.caching import stage_policy


@task(name="prepare", cache_policy=stage_policy("prepare", path_inputs=("raw_dir",)), persist_result=True)
def prepare_task(
    raw_dir: str, settings: dict[str, Any], prepared_dir: str = "data/prepared", reports_dir: str = "reports"
) -> dict[str, Any]:
    """Manifest, quality report, split and plot; keyed on the content of ``raw_dir``.

    Args:
        raw_dir: the fetched images.
        settings: the stage's settings (``prepare`` and ``split`` sections, ``input.max_image_*`` caps).
        prepared_dir: where ``manifest.csv`` and ``splits.csv`` go.
        reports_dir: where the data-quality report goes.

    Returns:
        Paths and hashes of the manifest, splits and quality report.
    """
    caps = {key.removeprefix("input."): value for key, value in settings.items() if key.startswith("input.")}
    return prepare(
        raw_dir,
        parse_section(SplitConfig, settings["split"], "split"),
        parse_section(PrepareConfig, settings["prepare"], "prepare"),
        prepared_dir=prepared_dir,
        reports_dir=reports_dir,
        input_params=parse_section(InputConfig, caps, "input"),
    )
