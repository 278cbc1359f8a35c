"""The ``fetch`` step: bring the configured data source into ``data/raw`` in Kaggle layout.

Every source ends as ``data/raw/[<split>/]<CLASS>/<file>`` plus a small record
(``data/fetch.json``) naming the source and the content digest of what was fetched. The new tree
is built in a temporary folder beside ``data/raw`` and renamed into place only when complete, so
an interrupted fetch never leaves a half dataset that a later step would trust.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr.config import DataConfig, as_section
from cxr.data import kaggle as kaggle_source
from cxr.data import medmnist as medmnist_source
from cxr.data.archive import ExtractLimits, safe_extract
from cxr.data.kaggle_layout import ClassFolder, find_class_folders
from cxr.errors import CxrError, DataError
from cxr.files import write_json
from cxr.provenance.hashing import hash_tree, sha256_file
from cxr.workspace import HERE

log = logging.getLogger(__name__)


def _dest(raw: Path, folder: ClassFolder) -> Path:
    return raw / folder.split / folder.class_name if folder.split else raw / folder.class_name


def _copy_dir_source(src: Path, raw: Path) -> None:
    for folder in find_class_folders(src):
        target_root = _dest(raw, folder)
        target_root.mkdir(parents=True, exist_ok=True)
        for path in sorted(folder.path.rglob("*")):
            rel = path.relative_to(folder.path)
            if any(part.startswith(".") for part in rel.parts) or not path.is_file():
                continue
            target = target_root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)  # content only: the source may be read-only


def _move_class_folders(extracted: Path, raw: Path) -> None:
    for folder in find_class_folders(extracted):
        target = _dest(raw, folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(folder.path, target)


def _counts(raw: Path) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for path in raw.rglob("*"):
        if path.is_file():
            counts["/".join(path.relative_to(raw).parts[:-1])] += 1
    return dict(sorted(counts.items()))


def _replace_dir(new: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class _Workspace:
    """Where a source writes while fetching: all of it is deleted once the fetch ends."""

    staged: Path  # the new data/raw, in Kaggle layout, renamed into place when complete
    scratch: Path  # room for downloads and extraction beside ``staged``
    raw_dir: Path  # the data/raw the staged tree will replace
    cache_dir: Path  # downloads kept between runs


def _fetch_dir(data: DataConfig, ws: _Workspace) -> dict[str, Any]:
    """Copy a local folder in Kaggle layout; the record names the folder."""
    src = Path(data.dir)
    if not data.dir:
        raise CxrError("data.source=dir needs data.dir: the folder in Kaggle layout to read")
    if src.resolve() == ws.raw_dir.resolve() or ws.raw_dir.resolve() in src.resolve().parents:
        raise CxrError(f"data.dir={src} is inside {ws.raw_dir}: point it at the original folder")
    _copy_dir_source(src, ws.staged)
    return {"origin": str(src)}


def _fetch_medmnist(data: DataConfig, ws: _Workspace) -> dict[str, Any]:
    """Write PneumoniaMNIST images from ``data.npz`` (downloaded into the cache when not given)."""
    npz_path = (
        Path(data.npz) if data.npz else medmnist_source.download_npz(data.medmnist_size, ws.cache_dir / "medmnist")
    )
    medmnist_source.materialise_npz(npz_path, ws.staged)
    return {"origin": str(npz_path), "origin_sha256": sha256_file(npz_path)}


def _extract_limits(data: DataConfig) -> ExtractLimits:
    return ExtractLimits(max_files=data.max_files, max_bytes=data.max_bytes)


def _fetch_kaggle(data: DataConfig, ws: _Workspace) -> dict[str, Any]:
    """Download ``data.kaggle_dataset``, extract it within limits and keep its class folders."""
    dataset = data.kaggle_dataset
    if dataset.count("/") not in (1, 2):
        raise CxrError(f"data.kaggle_dataset={dataset!r}: expected owner/slug[/version]")
    archive = kaggle_source.download_dataset(
        dataset,
        ws.cache_dir / "kaggle",
        retries=data.retries,
        backoff_s=data.retry_backoff_s,
    )
    safe_extract(archive, ws.scratch / "extract", _extract_limits(data))
    _move_class_folders(ws.scratch / "extract", ws.staged)
    version = dataset.split("/")[2] if dataset.count("/") == 2 else None
    return {"origin": dataset, "kaggle_version": version, "origin_sha256": sha256_file(archive)}


# Every source: (data section, workspace) -> its fields of the fetch record ("origin", digests).
_FETCHERS: dict[str, Callable[[DataConfig, _Workspace], dict[str, Any]]] = {
    "kaggle": _fetch_kaggle,
    "dir": _fetch_dir,
    "medmnist": _fetch_medmnist,
}
SOURCES = tuple(_FETCHERS)


def _contents(staged: Path, origin: Any) -> dict[str, Any]:
    """File count, per-folder counts and content digest of the staged tree; an empty tree is refused."""
    counts = _counts(staged)
    if not counts:
        raise DataError(f"{origin}: the class folders hold no files")
    return {"files": sum(counts.values()), "counts": counts, "tree_sha256": hash_tree(staged)}


def fetch(
    data: DataConfig | Mapping[str, Any],
    raw_dir: str | Path = HERE.raw,
    record_path: str | Path = HERE.fetch_record,
    cache_dir: str | Path = HERE.downloads,
) -> dict[str, Any]:
    """Materialise ``data.source`` into ``raw_dir`` and write the fetch record.

    Args:
        data: the ``data`` section (its dataclass, or the mapping): ``source`` (one of ``SOURCES``) and that
            source's settings
            (``dir``; ``npz``, ``medmnist_size``; ``kaggle_dataset``, ``retries``, ``retry_backoff_s``,
            ``max_files``, ``max_bytes``).
        raw_dir: the folder that receives the images in Kaggle layout (replaced as a whole).
        record_path: where the fetch record is written as JSON.
        cache_dir: downloads kept between runs (Kaggle zips, MedMNIST ``.npz`` files).

    Returns:
        The fetch record: the source, its origin (and digest where known), the file counts per
        folder and the content digest of ``raw_dir``.
    """
    data = as_section(DataConfig, data, "data")
    source = data.source
    if source not in SOURCES:
        raise CxrError(f"data.source={source!r}: choose one of {', '.join(SOURCES)}")
    raw_dir, record_path, cache_dir = Path(raw_dir), Path(record_path), Path(cache_dir)
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"source": source}
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=raw_dir.parent))
    try:
        staged = work / "raw"
        staged.mkdir()
        record.update(_FETCHERS[source](data, _Workspace(staged, work, raw_dir, cache_dir)))
        record.update(_contents(staged, record.get("origin")))
        _replace_dir(staged, raw_dir)
        write_json(record_path, record)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info(
        "fetched %d files from %s source %s into %s (tree %s)",
        record["files"],
        source,
        record.get("origin"),
        raw_dir,
        record["tree_sha256"][:12],
    )
    return record


def source_digest(data: DataConfig | Mapping[str, Any]) -> str | None:
    """Content digest of a *local* source (folder or .npz), so callers can tell if it changed.

    Args:
        data: the ``data`` section.

    Returns:
        The digest of ``data.dir`` (``dir``) or ``data.npz`` (``medmnist``); None for Kaggle (its
        content is only known after downloading) and for a local source that is not there.
    """
    data = as_section(DataConfig, data, "data")
    if data.source == "dir" and data.dir:
        src = Path(data.dir)
        return hash_tree(src) if src.is_dir() else None
    if data.source == "medmnist" and data.npz:
        npz = Path(data.npz)
        return sha256_file(npz) if npz.is_file() else None
    return None
