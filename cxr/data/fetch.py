"""The ``fetch`` step: bring the configured data source into ``data/raw`` in Kaggle layout.

Every source ends as ``data/raw/[<split>/]<CLASS>/<file>`` plus a small record
(``data/fetch.json``) naming the source and the content digest of what was fetched. The new tree
is built in a temporary folder beside ``data/raw``, its record written beside it, and both are put
in place only when complete (:mod:`cxr.data.staging`), under a lock that keeps a second run from
writing the same files (:mod:`cxr.locks`): an interrupted or concurrent fetch never leaves a half
dataset, or a record describing other data, that a later step would trust.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr.config import DataConfig
from cxr.data import kaggle as kaggle_source
from cxr.data import medmnist as medmnist_source
from cxr.data import sample as sample_source
from cxr.data.archive import ExtractLimits, safe_extract
from cxr.data.dir_copy import copy_dataset_folder
from cxr.data.kaggle_layout import ClassFolder, find_class_folders
from cxr.data.links import hash_linked_tree, link_roots
from cxr.data.staging import SCRATCH_PREFIX, install, recover, remove_tree
from cxr.errors import CxrError, DataError
from cxr.locks import lock_path, step_lock
from cxr.provenance.hashing import hash_tree, sha256_file
from cxr.workspace import HERE

log = logging.getLogger(__name__)


def _dest(raw: Path, folder: ClassFolder) -> Path:
    return raw / folder.split / folder.class_name if folder.split else raw / folder.class_name


def _copy_dir_source(src: Path, raw: Path, extra_roots: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Copy a local folder in Kaggle layout; the entries left out, with reasons (:mod:`cxr.data.dir_copy`)."""
    return copy_dataset_folder(src, raw, extra_roots)


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
    skipped = _copy_dir_source(src, ws.staged, data.link_roots)
    if skipped:
        log.warning("%d file(s) of %s were not copied (listed under 'skipped' in the fetch record)", len(skipped), src)
    return {"origin": str(src), "skipped": skipped}


def _fetch_medmnist(data: DataConfig, ws: _Workspace) -> dict[str, Any]:
    """Write PneumoniaMNIST images from ``data.npz`` (downloaded into the cache when not given)."""
    npz_path = (
        Path(data.npz) if data.npz else medmnist_source.download_npz(data.medmnist_size, ws.cache_dir / "medmnist")
    )
    medmnist_source.materialise_npz(npz_path, ws.staged)
    return {"origin": str(npz_path), "origin_sha256": sha256_file(npz_path)}


def _extract_limits(data: DataConfig) -> ExtractLimits:
    return ExtractLimits(max_files=data.max_files, max_bytes=data.max_bytes, max_ratio=data.max_ratio)


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


def _fetch_sample(data: DataConfig, ws: _Workspace) -> dict[str, Any]:
    """Copy the embedded demo sample (``cxr/data/sample_data``); the record flags it as a demonstration."""
    src = sample_source.sample_dir()
    sample_source.verify_sample(src)  # the shipped files, and only those, as MANIFEST.csv lists them
    _copy_dir_source(src, ws.staged)
    return {
        "origin": sample_source.SAMPLE_INPUT,
        "origin_sha256": hash_tree(src),
        "demo_sample": True,
        "licence": sample_source.LICENCE,
        "citation": sample_source.CITATION,
    }


# Every source: (data section, workspace) -> its fields of the fetch record ("origin", digests).
_FETCHERS: dict[str, Callable[[DataConfig, _Workspace], dict[str, Any]]] = {
    "kaggle": _fetch_kaggle,
    "dir": _fetch_dir,
    "medmnist": _fetch_medmnist,
    "sample": _fetch_sample,
}
SOURCES = (*_FETCHERS, "auto")


def resolve_source(data: DataConfig) -> str:
    """The concrete source a fetch of ``data`` uses: ``kaggle``, ``sample``, ``dir`` or ``medmnist``.

    ``data.source: auto`` (the default) resolves to ``kaggle`` when Kaggle credentials are configured
    (any kind the kaggle client accepts, looked up in its own order: :func:`cxr.data.kaggle.find_credentials`)
    and to ``sample`` (the embedded demo sample) when none are; any other source resolves to itself.
    Nothing is downloaded, logged or imported from the client; callers that must never run on the demo
    sample (scheduled runs) refuse when this returns ``"sample"``.

    Args:
        data: the ``data`` section.

    Returns:
        The source name.

    Raises:
        FetchError: ``auto`` with credentials that are configured but unusable (a credential file
            readable by other users, a broken ``kaggle.json``): the user meant Kaggle, so it is not
            silently replaced by the sample.
    """
    if data.source != "auto":
        return data.source
    try:
        kaggle_source.find_credentials()
    except kaggle_source.NoCredentialsError:
        return "sample"
    return "kaggle"


def _contents(staged: Path, origin: Any) -> dict[str, Any]:
    """File count, per-folder counts and content digest of the staged tree; an empty tree is refused."""
    counts = _counts(staged)
    if not counts:
        raise DataError(f"{origin}: the class folders hold no files")
    return {"files": sum(counts.values()), "counts": counts, "tree_sha256": hash_tree(staged)}


def fetch(
    data: DataConfig,
    raw_dir: str | Path = HERE.raw,
    record_path: str | Path = HERE.fetch_record,
    cache_dir: str | Path = HERE.downloads,
) -> dict[str, Any]:
    """Materialise ``data.source`` into ``raw_dir`` and write the fetch record.

    Args:
        data: the ``data`` section: ``source`` (one of ``SOURCES``; ``auto``
            is resolved by :func:`resolve_source`) and that source's settings
            (``dir``; ``npz``, ``medmnist_size``; ``kaggle_dataset``, ``retries``, ``retry_backoff_s``,
            ``max_files``, ``max_bytes``).
        raw_dir: the folder that receives the images in Kaggle layout (replaced as a whole).
        record_path: where the fetch record is written as JSON.
        cache_dir: downloads kept between runs (Kaggle zips, MedMNIST ``.npz`` files).

    Returns:
        The fetch record: the source (resolved), ``requested`` (``auto``) when that differs, its origin
        (and digest where known), ``demo_sample: true`` for the embedded sample, the file counts per
        folder and the content digest of ``raw_dir``.
    """
    source = resolve_source(data)
    if data.source == "auto" and source == "sample":
        log.warning(sample_source.FALLBACK_WARNING)
    raw_dir, record_path, cache_dir = Path(raw_dir), Path(record_path), Path(cache_dir)
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"source": source}
    if data.source != source:
        record["requested"] = data.source  # "auto"
    with step_lock(lock_path(raw_dir.parent, "fetch"), "fetch", raw_dir):
        recover(raw_dir, record_path)
        try:
            work = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=raw_dir.parent))
        except OSError as exc:  # name the folder to make writable, not our scratch folder's random name
            raise OSError(exc.errno, exc.strerror, str(raw_dir.parent)) from exc
        try:
            staged = work / "raw"
            staged.mkdir()
            record.update(_FETCHERS[source](data, _Workspace(staged, work, raw_dir, cache_dir)))
            record.update(_contents(staged, record.get("origin")))
            install(work, staged, record, raw_dir, record_path)
        finally:
            remove_tree(work)
    log.info(
        "fetched %d files from %s source %s into %s (tree %s)",
        record["files"],
        source,
        record.get("origin"),
        raw_dir,
        record["tree_sha256"][:12],
    )
    return record


def source_digest(data: DataConfig) -> str | None:
    """Content digest of a *local* source (folder or .npz), so callers can tell if it changed.

    Args:
        data: the ``data`` section.

    Returns:
        The digest of ``data.dir`` (``dir``) or ``data.npz`` (``medmnist``); ``sample:<digest>`` of the
        embedded sample when the source resolves to it (so ``auto`` keys differently once credentials
        appear); None for Kaggle (its content is only known after downloading) and for a local source
        that is not there.
    """
    if data.source in ("sample", "auto") and resolve_source(data) == "sample":
        return "sample:" + hash_tree(sample_source.sample_dir())
    if data.source == "dir" and data.dir:
        src = Path(data.dir)  # its links followed as the copy follows them (cxr.data.links)
        return hash_linked_tree(src, link_roots(src, data.link_roots)) if src.is_dir() else None
    if data.source == "medmnist" and data.npz:
        npz = Path(data.npz)
        return sha256_file(npz) if npz.is_file() else None
    return None
