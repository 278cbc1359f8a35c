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
from cxr.errors import DataError
from cxr.files import write_json
from cxr.provenance.hashing import sha256_file
from cxr.data.manifest import build_manifest
from cxr.reporting.plots import class_distribution
from cxr.data.split import STRATEGIES, assign_splits

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


def prepare(
    raw_dir: str | Path,
    split_params: Mapping[str, Any],
    prepare_params: Mapping[str, Any] | None = None,
    prepared_dir: str | Path = "data/prepared",
    reports_dir: str | Path = "reports",
) -> dict[str, Any]:
    """Run the step; return paths and content hashes of what it wrote."""
    started = time.perf_counter()
    prepare_params = prepare_params or {}
    raw_dir, prepared_dir, reports_dir = Path(raw_dir), Path(prepared_dir), Path(reports_dir)
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir}: not found; run the fetch step first (dvc repro fetch)")
    manifest, excluded = build_manifest(raw_dir, workers=int(prepare_params.get("workers", 0)))
    manifest, dup_summary, conflict_excluded = _duplicates(manifest)
    excluded += conflict_excluded

    minimum = int(prepare_params.get("min_images_per_class", 1))
    class_counts = {c: int((manifest["class_name"] == c).sum()) for c in CLASS_NAMES}
    short = {c: n for c, n in class_counts.items() if n < max(minimum, 1)}
    if short:
        detail = ", ".join(f"{c}={n}" for c, n in short.items())
        raise DataError(
            f"{raw_dir}: too few usable images ({detail}; prepare.min_images_per_class={minimum}); "
            f"{len(excluded)} files were excluded, see the log"
        )

    strategy = str(split_params.get("strategy", "patient"))
    kwargs = {
        "test_size": float(split_params.get("test_size", 0.2)),
        "val_size": float(split_params.get("val_size", 0.2)),
        "seed": int(split_params.get("seed", 42)),
    }
    summaries: dict[str, Any] = {}
    chosen = None
    for name in STRATEGIES:  # both, so the report can show what the other one would leak
        split, summaries[name] = assign_splits(manifest, name, **kwargs)
        if name == strategy:
            chosen = split
    if chosen is None:  # assign_splits raised for an unknown strategy before reaching here
        raise DataError(f"split.strategy={strategy!r}")

    manifest_path = prepared_dir / "manifest.csv"
    splits_path = prepared_dir / "splits.csv"
    _write_csv(manifest, manifest_path)
    splits = manifest.assign(split=chosen)
    splits = splits[splits["split"] != "excluded"][SPLIT_COLUMNS]
    _write_csv(splits, splits_path)

    patients = manifest.loc[manifest["patient_id"] != "", "patient_id"]
    quality = {
        "raw_dir": raw_dir.as_posix(),
        "images_listed": len(manifest) + len(excluded) - sum(
            1 for e in excluded if e["reason"] == "not an image file name"),
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
    quality_path = reports_dir / "data_quality.json"
    write_json(quality_path, quality)
    for reason in sorted({e["reason"] for e in excluded}):
        n = sum(e["reason"] == reason for e in excluded)
        log.warning("excluded %d file(s): %s", n, reason)
    plot_path = class_distribution(summaries[strategy]["counts"],
                                   reports_dir / "plots" / "class_distribution.png",
                                   f"Class distribution ({strategy} split)")
    leak = summaries[strategy]["leakage"]
    log.info("split %s: %s; leakage clean=%s; prepared in %.1f s", strategy,
             {s: sum(c.values()) for s, c in summaries[strategy]["counts"].items()},
             leak["clean"], time.perf_counter() - started)
    return {
        "manifest": manifest_path.as_posix(), "manifest_sha256": quality["manifest_sha256"],
        "splits": splits_path.as_posix(), "splits_sha256": quality["splits_sha256"],
        "quality": quality_path.as_posix(), "quality_sha256": sha256_file(quality_path),
        "plot": plot_path.as_posix(),
    }
