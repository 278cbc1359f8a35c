"""The ``prepare`` step: manifest, data-quality report, leakage-free split, class plot.

Inputs: ``data/raw``. Outputs: ``data/prepared/manifest.csv``, ``data/prepared/splits.csv``,
``reports/data_quality.json``, ``reports/plots/class_distribution.png``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from cxr import CLASS_NAMES
from cxr.config import PrepareConfig, SplitConfig, as_section
from cxr.data.manifest import build_manifest
from cxr.data.split import STRATEGIES, assign_splits
from cxr.errors import DataError
from cxr.files import write_json
from cxr.provenance.hashing import sha256_file
from cxr.reporting.plots import class_distribution
from cxr.workspace import HERE

log = logging.getLogger(__name__)

SPLIT_COLUMNS = ["path", "label", "class_name", "split", "patient_id", "subtype", "sha256"]


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    frame.to_csv(tmp, index=False, lineterminator="\n")
    os.replace(tmp, path)


def _duplicates(manifest: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any], list[dict[str, str]]]:
    """Drop byte-identical files filed under both classes; summarise the rest (kept, grouped)."""
    by_hash = manifest.groupby("sha256")
    sizes = by_hash["path"].transform("size")
    conflicting = by_hash["label"].transform("nunique") > 1
    excluded = [
        {"path": p, "reason": "identical bytes filed under both NORMAL and PNEUMONIA"}
        for p in manifest.loc[conflicting, "path"]
    ]
    dup = manifest[(sizes > 1) & ~conflicting]
    summary = {
        "duplicate_groups": int(dup["sha256"].nunique()),
        "duplicate_files": len(dup),
        "conflicting_label_files": len(excluded),
        "policy": "kept; identical files always share a split",
        "examples": [sorted(g["path"].tolist()) for _, g in list(dup.groupby("sha256"))[:5]],
    }
    return manifest[~conflicting].reset_index(drop=True), summary, excluded


def _usable_manifest(
    raw_dir: Path, prepare_params: PrepareConfig
) -> tuple[pd.DataFrame, dict[str, Any], list[dict[str, str]]]:
    """Manifest of the readable images, the duplicate summary, and the files excluded with their reasons."""
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir}: not found; run the fetch step first (dvc repro fetch)")
    manifest, excluded = build_manifest(raw_dir, workers=prepare_params.workers)
    manifest, dup_summary, conflict_excluded = _duplicates(manifest)
    return manifest, dup_summary, excluded + conflict_excluded


def _class_counts(
    manifest: pd.DataFrame, excluded: list[dict[str, str]], raw_dir: Path, prepare_params: PrepareConfig
) -> dict[str, int]:
    """Usable images per class; fewer than ``prepare.min_images_per_class`` in a class is refused."""
    minimum = prepare_params.min_images_per_class
    class_counts = {c: int((manifest["class_name"] == c).sum()) for c in CLASS_NAMES}
    short = {c: n for c, n in class_counts.items() if n < max(minimum, 1)}
    if short:
        detail = ", ".join(f"{c}={n}" for c, n in short.items())
        raise DataError(
            f"{raw_dir}: too few usable images ({detail}; prepare.min_images_per_class={minimum}); "
            f"{len(excluded)} files were excluded, see the log"
        )
    return class_counts


def _split(manifest: pd.DataFrame, split_params: SplitConfig) -> tuple[str, Any, dict[str, Any]]:
    """The configured strategy, its split per manifest row, and the summaries of every strategy."""
    strategy = split_params.strategy
    kwargs = {"test_size": split_params.test_size, "val_size": split_params.val_size, "seed": split_params.seed}
    summaries: dict[str, Any] = {}
    chosen = None
    for name in STRATEGIES:  # both, so the report can show what the other one would leak
        split, summaries[name] = assign_splits(manifest, name, **kwargs)
        if name == strategy:
            chosen = split
    if chosen is None:  # assign_splits raised for an unknown strategy before reaching here
        raise DataError(f"split.strategy={strategy!r}")
    return strategy, chosen, summaries


def _write_tables(manifest: pd.DataFrame, chosen: Any, prepared_dir: Path) -> tuple[Path, Path]:
    """Write ``manifest.csv`` (every usable image) and ``splits.csv`` (those assigned a split)."""
    manifest_path = prepared_dir / "manifest.csv"
    splits_path = prepared_dir / "splits.csv"
    _write_csv(manifest, manifest_path)
    splits = manifest.assign(split=chosen)
    splits = splits[splits["split"] != "excluded"][SPLIT_COLUMNS]
    _write_csv(splits, splits_path)
    return manifest_path, splits_path


def _quality_report(
    raw_dir: Path,
    manifest: pd.DataFrame,
    excluded: list[dict[str, str]],
    dup_summary: dict[str, Any],
    class_counts: dict[str, int],
    split: tuple[str, dict[str, Any]],
    tables: tuple[Path, Path],
) -> dict[str, Any]:
    """The content of ``data_quality.json``; ``split`` is (strategy, summaries), ``tables`` the two CSVs."""
    strategy, summaries = split
    manifest_path, splits_path = tables
    patients = manifest.loc[manifest["patient_id"] != "", "patient_id"]
    not_images = sum(1 for e in excluded if e["reason"] == "not an image file name")
    return {
        "raw_dir": raw_dir.as_posix(),
        "images_listed": len(manifest) + len(excluded) - not_images,
        "images_usable": len(manifest),
        "class_counts": class_counts,
        "excluded_count": len(excluded),
        "excluded": sorted(excluded, key=lambda e: e["path"]),
        "duplicates": dup_summary,
        "patients": {
            "with_id": len(patients),
            "without_id": int((manifest["patient_id"] == "").sum()),
            "distinct": int(patients.nunique()),
        },
        "geometry": {
            "grayscale_files": int((manifest["channels"] == 1).sum()),
            "width_range": [int(manifest["width"].min()), int(manifest["width"].max())],
            "height_range": [int(manifest["height"].min()), int(manifest["height"].max())],
        },
        "split_strategy": strategy,
        "splits": summaries,
        "manifest_sha256": sha256_file(manifest_path),
        "splits_sha256": sha256_file(splits_path),
    }


def _log_exclusions(excluded: list[dict[str, str]]) -> None:
    for reason in sorted({e["reason"] for e in excluded}):
        n = sum(e["reason"] == reason for e in excluded)
        log.warning("excluded %d file(s): %s", n, reason)


def _plot_classes(strategy: str, summary: Mapping[str, Any], reports_dir: Path) -> Path:
    """Bar plot of the images per class and split of the chosen split."""
    return class_distribution(
        summary["counts"],
        reports_dir / "plots" / "class_distribution.png",
        f"Class distribution ({strategy} split)",
    )


def _log_split(strategy: str, summary: Mapping[str, Any], started: float) -> None:
    log.info(
        "split %s: %s; leakage clean=%s; prepared in %.1f s",
        strategy,
        {s: sum(c.values()) for s, c in summary["counts"].items()},
        summary["leakage"]["clean"],
        time.perf_counter() - started,
    )


def prepare(
    raw_dir: str | Path,
    split_params: SplitConfig | Mapping[str, Any],
    prepare_params: PrepareConfig | Mapping[str, Any] | None = None,
    prepared_dir: str | Path = HERE.prepared,
    reports_dir: str | Path = HERE.reports,
) -> dict[str, Any]:
    """Build the manifest, check the data, split it without leakage and plot the class balance.

    Args:
        raw_dir: the fetched images in Kaggle layout.
        split_params: the ``split`` section (its dataclass or the mapping): ``strategy`` (``patient``,
            the default, or ``seed``: the notebook's image-level split), ``test_size``, ``val_size``, ``seed``.
        prepare_params: the ``prepare`` section: ``workers`` (image probing), ``min_images_per_class``
            (None = the defaults).
        prepared_dir: where ``manifest.csv`` and ``splits.csv`` are written.
        reports_dir: where ``data_quality.json`` and ``plots/class_distribution.png`` are written.

    Returns:
        Paths and content hashes of what the step wrote (``manifest``, ``splits``, ``quality``,
        each with its ``*_sha256``, and ``plot``).
    """
    started = time.perf_counter()
    split_params = as_section(SplitConfig, split_params, "split")
    prepare_params = as_section(PrepareConfig, prepare_params, "prepare")
    raw_dir, prepared_dir, reports_dir = Path(raw_dir), Path(prepared_dir), Path(reports_dir)
    manifest, dup_summary, excluded = _usable_manifest(raw_dir, prepare_params)
    class_counts = _class_counts(manifest, excluded, raw_dir, prepare_params)
    strategy, chosen, summaries = _split(manifest, split_params)
    manifest_path, splits_path = _write_tables(manifest, chosen, prepared_dir)
    quality = _quality_report(
        raw_dir, manifest, excluded, dup_summary, class_counts, (strategy, summaries), (manifest_path, splits_path)
    )
    quality_path = reports_dir / "data_quality.json"
    write_json(quality_path, quality)
    _log_exclusions(excluded)
    plot_path = _plot_classes(strategy, summaries[strategy], reports_dir)
    _log_split(strategy, summaries[strategy], started)
    return {
        "manifest": manifest_path.as_posix(),
        "manifest_sha256": quality["manifest_sha256"],
        "splits": splits_path.as_posix(),
        "splits_sha256": quality["splits_sha256"],
        "quality": quality_path.as_posix(),
        "quality_sha256": sha256_file(quality_path),
        "plot": plot_path.as_posix(),
    }
