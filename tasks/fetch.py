"""Prefect task for the ``fetch`` step (wraps :func:`cxr.data.fetch.fetch`)."""

from __future__ import annotations

from typing import Any

from prefect import task

from cxr.data.fetch import fetch
from tasks.caching import ContentPolicy

FETCH_CODE = ("cxr/data/fetch.py", "cxr/data/kaggle.py", "cxr/data/medmnist.py", "cxr/data/archive.py",
              "cxr/data/kaggle_layout.py")


@task(
    name="fetch",
    cache_policy=ContentPolicy(code=FETCH_CODE),
    persist_result=True,
    retries=2,
    retry_delay_seconds=[10, 60],
)
def fetch_task(data: dict[str, Any], source_digest: str | None, raw_dir: str = "data/raw",
               record: str = "data/fetch.json") -> dict[str, Any]:
    """Fetch the data source; ``source_digest`` (content of a local source) keys the cache."""
    result = fetch(data, raw_dir=raw_dir, record_path=record)
    return {"raw": raw_dir, "raw_sha256": result["tree_sha256"], "record": record,
            "files": result["files"], "source": result["source"]}
