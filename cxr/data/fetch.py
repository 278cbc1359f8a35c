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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cxr.data import kaggle as kaggle_source
from cxr.data import medmnist as medmnist_source
from cxr.data.archive import ExtractLimits, safe_extract
from cxr.errors import CxrError, DataError
from cxr.files import write_json
from cxr.provenance.hashing import hash_tree, sha256_file
from cxr.data.kaggle_layout import ClassFolder, find_class_folders

log = logging.getLogger(__name__)

SOURCES = ("kaggle", "dir", "medmnist")


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


def fetch(
    data: Mapping[str, Any],
    raw_dir: str | Path = "data/raw",
    record_path: str | Path = "data/fetch.json",
    cache_dir: str | Path = "data/.cache",
) -> dict[str, Any]:
    """Materialise ``data.source`` into ``raw_dir`` and write the fetch record; return the record."""
    source = data.get("source")
    if source not in SOURCES:
        raise CxrError(f"data.source={source!r}: choose one of {', '.join(SOURCES)}")
    raw_dir, record_path, cache_dir = Path(raw_dir), Path(record_path), Path(cache_dir)
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"source": source}
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=raw_dir.parent))
    try:
        staged = work / "raw"
        staged.mkdir()
        if source == "dir":
            src = Path(str(data.get("dir") or ""))
            if not str(data.get("dir") or ""):
                raise CxrError("data.source=dir needs data.dir: the folder in Kaggle layout to read")
            if src.resolve() == raw_dir.resolve() or raw_dir.resolve() in src.resolve().parents:
                raise CxrError(f"data.dir={src} is inside {raw_dir}: point it at the original folder")
            _copy_dir_source(src, staged)
            record["origin"] = str(src)
        elif source == "medmnist":
            npz = str(data.get("npz") or "")
            size = int(data.get("medmnist_size", 28))
            npz_path = Path(npz) if npz else medmnist_source.download_npz(size, cache_dir / "medmnist")
            medmnist_source.materialise_npz(npz_path, staged)
            record.update(origin=str(npz_path), origin_sha256=sha256_file(npz_path))
        else:
            dataset = str(data.get("kaggle_dataset") or "")
            if dataset.count("/") not in (1, 2):
                raise CxrError(f"data.kaggle_dataset={dataset!r}: expected owner/slug[/version]")
            archive = kaggle_source.download_dataset(
                dataset,
                cache_dir / "kaggle",
                retries=int(data.get("retries", 4)),
                backoff_s=float(data.get("retry_backoff_s", 2.0)),
            )
            limits = ExtractLimits(
                max_files=int(data.get("max_files", ExtractLimits.max_files)),
                max_bytes=int(float(data.get("max_bytes", ExtractLimits.max_bytes))),
            )
            safe_extract(archive, work / "extract", limits)
            _move_class_folders(work / "extract", staged)
            version = dataset.split("/")[2] if dataset.count("/") == 2 else None
            record.update(origin=dataset, kaggle_version=version, origin_sha256=sha256_file(archive))
        counts = _counts(staged)
        if not counts:
            raise DataError(f"{record.get('origin')}: the class folders hold no files")
        record.update(files=sum(counts.values()), counts=counts, tree_sha256=hash_tree(staged))
        _replace_dir(staged, raw_dir)
        write_json(record_path, record)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("fetched %d files from %s source %s into %s (tree %s)", record["files"], source,
             record.get("origin"), raw_dir, record["tree_sha256"][:12])
    return record


def source_digest(data: Mapping[str, Any]) -> str | None:
    """Content digest of a *local* source (folder or .npz), so callers can tell if it changed.

    None for Kaggle: its content is only known after downloading.
    """
    source = data.get("source")
    if source == "dir" and data.get("dir"):
        src = Path(str(data["dir"]))
        return hash_tree(src) if src.is_dir() else None
    if source == "medmnist" and data.get("npz"):
        npz = Path(str(data["npz"]))
        return sha256_file(npz) if npz.is_file() else None
    return None
