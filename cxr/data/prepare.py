"""The ``prepare`` step: manifest, data-quality report, leakage-free split, class plot.

Inputs: ``data/raw``. Outputs: ``data/prepared/manifest.csv``, ``data/prepared/splits.csv``,
``reports/data_quality.json``, ``reports/plots/class_distribution.png``.

The step runs under ``data/prepared/.prepare.lock`` and the fetch lock (:mod:`cxr.locks`), so a second
prepare waits or stops, and no fetch replaces ``data/raw`` while it is read. Every output is first
written to a temporary file beside it (``.<name>.tmp-<pid>.<ext>``); only when all of them are
complete are they renamed into place, in one commit that puts the previous files back if a rename
fails. ``splits.csv`` names the manifest it was cut from (:mod:`cxr.data.pairing`), so even a kill
between two renames cannot leave a pair that readers accept. A failed run leaves no temporary file,
and the previous outputs as they were.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from cxr import CLASS_NAMES
from cxr.common.images import ImageLimits
from cxr.common.plots import class_distribution
from cxr.config import InputConfig, PrepareConfig, SplitConfig
from cxr.data.manifest import build_manifest
from cxr.data.pairing import PAIR_COLUMN
from cxr.data.split import STRATEGIES, assign_splits
from cxr.errors import DataError
from cxr.files import dumps_json
from cxr.locks import lock_path, step_lock
from cxr.provenance.hashing import sha256_file
from cxr.safe_text import is_utf8, printable
from cxr.workspace import HERE

log = logging.getLogger(__name__)

SPLIT_COLUMNS = ["path", "label", "class_name", "split", "patient_id", "subtype", "sha256", PAIR_COLUMN]
NOT_UTF8 = "file name is not valid UTF-8: rename it"


def _temp_name(path: Path, pid: int | str) -> Path:
    """``.<stem>.tmp-<pid><suffix>`` beside ``path`` (the suffix kept: matplotlib picks the format by it)."""
    return path.with_name(f".{path.stem}.tmp-{pid}{path.suffix}")


class _Commit:
    """Outputs written to temporary files first, then renamed into place together.

    ``write`` names the output's file (a write error names it, not the temporary file); ``commit``
    renames them in order and, if one rename fails (or the run is interrupted), puts back the outputs
    already replaced. Temporary files never survive: ``discard`` (in a ``finally``) deletes them.
    """

    def __init__(self) -> None:
        self.staged: list[tuple[Path, Path]] = []

    def write(self, path: Path, writer: Callable[[Path], object]) -> Path:
        """Run ``writer(tmp)`` for the output ``path``; the temporary file written."""
        tmp = _temp_name(path, os.getpid())
        self.staged.append((tmp, path))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            writer(tmp)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        return tmp

    def commit(self) -> None:
        pid = os.getpid()
        done: list[tuple[Path, Path | None]] = []
        try:
            for tmp, path in self.staged:
                backup = None
                if path.is_file():
                    backup = path.with_name(f".{path.stem}.tmp-old-{pid}{path.suffix}")
                    _keep_copy(path, backup)
                done.append((path, backup))
                os.replace(tmp, path)
        except BaseException:
            for path, backup in reversed(done):
                if backup is not None:
                    os.replace(backup, path)
                else:
                    path.unlink(missing_ok=True)
            raise
        finally:
            for _, backup in done:
                if backup is not None:
                    backup.unlink(missing_ok=True)

    def discard(self) -> None:
        for tmp, _ in self.staged:
            tmp.unlink(missing_ok=True)


def _keep_copy(path: Path, backup: Path) -> None:
    backup.unlink(missing_ok=True)
    try:
        os.link(path, backup)  # the old bytes stay reachable under a second name, at no cost
    except OSError:
        shutil.copyfile(path, backup)


def _remove_stale_temps(outputs: list[Path]) -> None:
    """Delete the temporary files a killed prepare left beside its outputs (called under the lock)."""
    for path in outputs:
        # this version's names, and those of earlier versions (.manifest.csv.tmp-<pid>)
        for stale in {*path.parent.glob(f".{path.stem}.tmp-*{path.suffix}"), *path.parent.glob(f".{path.name}.tmp-*")}:
            stale.unlink(missing_ok=True)
            log.info("deleted %s, left by an interrupted prepare", printable(stale))


def _drop_undecodable_names(
    manifest: pd.DataFrame, excluded: list[dict[str, str]]
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Exclude images whose name is not UTF-8 (no CSV, JSON or later step can carry it); escape such names."""
    bad = ~manifest["path"].map(is_utf8).astype(bool)
    moved = [{"path": printable(p), "reason": NOT_UTF8} for p in manifest.loc[bad, "path"]]
    shown = [e if is_utf8(e["path"]) else {**e, "path": printable(e["path"])} for e in excluded]
    return manifest[~bad].reset_index(drop=True), shown + moved


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


def _check_raw(raw_dir: Path) -> None:
    if not raw_dir.is_dir():
        raise DataError(f"{printable(raw_dir)}: not found; run the fetch step first (dvc repro fetch)")


def _usable_manifest(
    raw_dir: Path, prepare_params: PrepareConfig, limits: ImageLimits
) -> tuple[pd.DataFrame, dict[str, Any], list[dict[str, str]]]:
    """Manifest of the readable images, the duplicate summary, and the files excluded with their reasons."""
    _check_raw(raw_dir)
    manifest, excluded = build_manifest(raw_dir, workers=prepare_params.workers, limits=limits)
    manifest, excluded = _drop_undecodable_names(manifest, excluded)
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


def _split(manifest: pd.DataFrame, split_params: SplitConfig) -> tuple[str, pd.Series, dict[str, Any]]:
    """The configured strategy, its split per manifest row, and the summaries of every strategy."""
    strategy = split_params.strategy
    summaries: dict[str, Any] = {}
    chosen = None
    for name in STRATEGIES:  # both, so the report can show what the other one would leak
        split, summaries[name] = assign_splits(
            manifest, name, test_size=split_params.test_size, val_size=split_params.val_size, seed=split_params.seed
        )
        if name == strategy:
            chosen = split
    if chosen is None:  # assign_splits raised for an unknown strategy before reaching here
        raise DataError(f"split.strategy={strategy!r}")
    return strategy, chosen, summaries


def _csv_writer(frame: pd.DataFrame) -> Callable[[Path], None]:
    return lambda tmp: frame.to_csv(tmp, index=False, lineterminator="\n")


def _stage_tables(
    manifest: pd.DataFrame, chosen: pd.Series, prepared_dir: Path, commit: _Commit
) -> tuple[tuple[Path, Path], tuple[str, str]]:
    """Stage ``manifest.csv`` (every usable image) and ``splits.csv`` (those assigned a split, each row
    naming the manifest's sha256); their paths and the sha256s of the bytes staged."""
    manifest_path = prepared_dir / "manifest.csv"
    splits_path = prepared_dir / "splits.csv"
    manifest_sha = sha256_file(commit.write(manifest_path, _csv_writer(manifest)))
    splits = manifest.assign(split=chosen, **{PAIR_COLUMN: manifest_sha})
    splits = splits[splits["split"] != "excluded"][SPLIT_COLUMNS]
    splits_sha = sha256_file(commit.write(splits_path, _csv_writer(splits)))
    return (manifest_path, splits_path), (manifest_sha, splits_sha)


def _quality_report(
    raw_dir: Path,
    manifest: pd.DataFrame,
    excluded: list[dict[str, str]],
    dup_summary: dict[str, Any],
    class_counts: dict[str, int],
    split: tuple[str, dict[str, Any]],
    hashes: tuple[str, str],
) -> dict[str, Any]:
    """The content of ``data_quality.json``; ``split`` is (strategy, summaries), ``hashes`` the two CSVs' sha256s."""
    strategy, summaries = split
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
        "manifest_sha256": hashes[0],
        "splits_sha256": hashes[1],
    }


def _log_exclusions(excluded: list[dict[str, str]]) -> None:
    for reason in sorted({e["reason"] for e in excluded}):
        n = sum(e["reason"] == reason for e in excluded)
        log.warning("excluded %d file(s): %s", n, reason)


def _plot_classes(strategy: str, summary: Mapping[str, Any], reports_dir: Path, commit: _Commit) -> Path:
    """Stage the bar plot of the images per class and split of the chosen split; its output path."""
    path = reports_dir / "plots" / "class_distribution.png"
    commit.write(path, lambda tmp: class_distribution(summary["counts"], tmp, f"Class distribution ({strategy} split)"))
    return path


def _outputs(prepared_dir: Path, reports_dir: Path) -> list[Path]:
    return [
        prepared_dir / "manifest.csv",
        prepared_dir / "splits.csv",
        reports_dir / "data_quality.json",
        reports_dir / "plots" / "class_distribution.png",
    ]


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
    split_params: SplitConfig,
    prepare_params: PrepareConfig | None = None,
    prepared_dir: str | Path = HERE.prepared,
    reports_dir: str | Path = HERE.reports,
    input_params: InputConfig | None = None,
) -> dict[str, Any]:
    """Build the manifest, check the data, split it without leakage and plot the class balance.

    Args:
        raw_dir: the fetched images in Kaggle layout.
        split_params: the ``split`` section: ``strategy`` (``patient``,
            the default, or ``seed``: the notebook's image-level split), ``test_size``, ``val_size``, ``seed``.
        prepare_params: the ``prepare`` section: ``workers`` (image probing), ``min_images_per_class``
            (None = the defaults).
        prepared_dir: where ``manifest.csv`` and ``splits.csv`` are written.
        reports_dir: where ``data_quality.json`` and ``plots/class_distribution.png`` are written.
        input_params: the decode caps ``max_image_pixels`` and ``max_image_bytes`` of the ``input``
            section (None = the defaults): larger images are excluded.

    Returns:
        Paths and content hashes of what the step wrote (``manifest``, ``splits``, ``quality``,
        each with its ``*_sha256``, and ``plot``): the files this run wrote, whatever runs after it.

    Raises:
        LockBusy: another prepare (or a fetch of ``raw_dir``) still runs after ``CXR_LOCK_WAIT_S``.
        DataError: no usable data; OSError: an output cannot be written (nothing is replaced then).
    """
    started = time.perf_counter()
    prepare_params = prepare_params or PrepareConfig()
    raw_dir, prepared_dir, reports_dir = Path(raw_dir), Path(prepared_dir), Path(reports_dir)
    _check_raw(raw_dir)  # before creating anything (the lock files); checked again under the locks
    with (
        step_lock(lock_path(prepared_dir, "prepare"), "prepare", prepared_dir),
        step_lock(lock_path(raw_dir.parent, "fetch"), "prepare", raw_dir, read_guard=True),
    ):
        _remove_stale_temps(_outputs(prepared_dir, reports_dir))
        manifest, dup_summary, excluded = _usable_manifest(raw_dir, prepare_params, ImageLimits.of(input_params))
        class_counts = _class_counts(manifest, excluded, raw_dir, prepare_params)
        strategy, chosen, summaries = _split(manifest, split_params)
        written = _write_outputs(
            raw_dir,
            prepared_dir,
            reports_dir,
            manifest,
            chosen,
            excluded,
            dup_summary,
            class_counts,
            (strategy, summaries),
        )
    _log_exclusions(excluded)
    _log_split(strategy, summaries[strategy], started)
    return written


def _write_outputs(
    raw_dir: Path,
    prepared_dir: Path,
    reports_dir: Path,
    manifest: pd.DataFrame,
    chosen: pd.Series,
    excluded: list[dict[str, str]],
    dup_summary: dict[str, Any],
    class_counts: dict[str, int],
    split: tuple[str, dict[str, Any]],
) -> dict[str, str]:
    """Write ``manifest.csv``, ``splits.csv``, ``data_quality.json`` and the class plot together: all
    staged first, then committed (nothing is replaced if one fails); their paths and sha256s.

    ``chosen`` is the configured strategy's split per manifest row, ``split`` is (strategy, summaries).
    """
    strategy, summaries = split
    commit = _Commit()
    try:
        (manifest_path, splits_path), hashes = _stage_tables(manifest, chosen, prepared_dir, commit)
        quality = _quality_report(raw_dir, manifest, excluded, dup_summary, class_counts, split, hashes)
        quality_path = reports_dir / "data_quality.json"
        quality_text = dumps_json(quality, indent=2, sort_keys=True) + "\n"
        quality_sha = sha256_file(commit.write(quality_path, lambda tmp: tmp.write_text(quality_text)))
        plot_path = _plot_classes(strategy, summaries[strategy], reports_dir, commit)
        commit.commit()
    finally:
        commit.discard()
    return {
        "manifest": manifest_path.as_posix(),
        "manifest_sha256": hashes[0],
        "splits": splits_path.as_posix(),
        "splits_sha256": hashes[1],
        "quality": quality_path.as_posix(),
        "quality_sha256": quality_sha,
        "plot": plot_path.as_posix(),
    }
