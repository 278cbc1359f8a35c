"""Prefect task for the ``fetch`` stage (wraps :func:`cxr.data.fetch.fetch`)."""

from __future__ import annotations

from typing import Any

from prefect import task

from cxr.config import DataConfig, parse_section
from cxr.data.fetch import fetch
from tasks.caching import stage_policy


@task(
    name="fetch",
    cache_policy=stage_policy("fetch", path_inputs=("inputs",)),
    persist_result=True,
    retries=2,
    retry_delay_seconds=[10, 60],
)
def fetch_task(
    settings: dict[str, Any],
    inputs: list[str],
    source_digest: str | None,
    raw_dir: str = "data/raw",
    record: str = "data/fetch.json",
) -> dict[str, Any]:
    """Fetch the data source.

    Args:
        settings: the stage's settings (``{"data": {...}}``).
        inputs: the stage's data inputs (``data.dir``, watched as DVC watches it).
        source_digest: content of a local source (a folder or a MedMNIST ``.npz``); keys the cache.
        raw_dir: where the images land.
        record: the fetch record written beside them.

    Returns:
        Paths and hashes of what was fetched.
    """
    result = fetch(parse_section(DataConfig, settings["data"], "data"), raw_dir=raw_dir, record_path=record)
    return {
        "raw": raw_dir,
        "raw_sha256": result["tree_sha256"],
        "record": record,
        "files": result["files"],
        "source": result["source"],
    }
