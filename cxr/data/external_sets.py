"""External validation sets: labelled folders from outside the training data.

A held-out slice of the training folder is in-distribution and flatters every model; a hospital
trusts a model only after scoring it on its own labelled films. ``params.yaml: evaluate.external``
names such folders (``{NORMAL,PNEUMONIA}/`` or Kaggle layout). The ``external`` step indexes each
one into ``data/external/<name>.csv`` (path, label, patient id, sha256 of every readable image)
and ``data/external/<name>.json`` (counts, excluded files with their reasons, overlap with the
train and validation splits); ``evaluate`` scores every model on the indexed files and checks their hashes.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr import CLASS_NAMES
from cxr.common.images import probe
from cxr.config import EvaluateConfig
from cxr.data.kaggle_layout import find_class_folders
from cxr.data.links import OUTSIDE_FOLDER, link_roots, walk_files
from cxr.data.manifest import parse_patient
from cxr.errors import DataError
from cxr.files import load_json_bounded, write_json
from cxr.provenance.hashing import sha256_file, tree_digest
from cxr.workspace import HERE

log = logging.getLogger(__name__)

EXTERNAL_DIR = HERE.external
COLUMNS = ("path", "label", "class_name", "patient_id", "sha256")


def external_sets(eval_params: EvaluateConfig) -> dict[str, str]:
    """``evaluate.external``: ``{name: folder}`` (empty when none is configured).

    Args:
        eval_params: the ``evaluate`` section (its set names were checked when it was read).

    Returns:
        ``{set name: folder}``; names start with a letter and are not a split name.
    """
    return dict(eval_params.external)


@dataclass(frozen=True)
class ExternalSet:
    """The indexed images of one external set."""

    name: str
    paths: list[str]
    labels: np.ndarray  # 0 normal, 1 pneumonia
    groups: list[str]  # patient ids ("" = unknown: each image its own group)
    sha256: list[str]

    @property
    def prevalence(self) -> float:
        return float(self.labels.mean()) if len(self.labels) else float("nan")


def _training_overlap(rows: list[dict[str, Any]], splits_csv: Path) -> dict[str, Any]:
    """Identical files and named patients the external set shares with the images the models learned
    from or were selected on (the train and validation splits; the test split is scored, not learned)."""
    if not splits_csv.is_file():
        return {"checked": False}
    import pandas as pd

    learned = pd.read_csv(splits_csv, keep_default_na=False, dtype={"patient_id": str})
    if "split" in learned:
        learned = learned[learned["split"].isin(["train", "val"])]
    train_hashes = set(learned.get("sha256", []))
    # Only the Kermany "person<N>" ids name a child; IM-<S> study numbers are reused between batches.
    train_patients = {p for p in learned.get("patient_id", []) if str(p).startswith("person")}
    same_files = sorted({r["path"] for r in rows if r["sha256"] in train_hashes})
    patients = sorted({r["patient_id"] for r in rows if r["patient_id"] in train_patients})
    return {
        "checked": True,
        "identical_files": len(same_files),
        "identical_file_examples": same_files[:5],
        "shared_patient_ids": len(patients),
        "shared_patient_examples": patients[:5],
    }


def _index_rows(folder: Path, extra_roots: Sequence[str] = ()) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """One row per readable image of ``folder`` (its ``COLUMNS``), and the files left out with their
    reasons: unreadable ones, and links that lead outside the folder, its DVC cache and
    ``data.link_roots`` (:mod:`cxr.data.links`)."""
    from imutils.paths import image_types

    rows: list[dict[str, Any]] = []
    excluded: list[dict[str, str]] = []
    folders = find_class_folders(folder)
    roots = link_roots(folder, extra_roots)
    for class_folder in folders:
        if not roots.admits(class_folder.path.resolve()):
            excluded.append({"path": class_folder.path.as_posix(), "reason": OUTSIDE_FOLDER})
            continue
        for path, reason in walk_files(class_folder.path, roots):
            if not path.name.lower().endswith(image_types):  # what imutils.paths.list_images lists
                continue
            info = {"error": reason} if reason else probe(path)
            if "error" in info:
                excluded.append({"path": path.as_posix(), "reason": info["error"]})
                continue
            rows.append(
                {
                    "path": path.as_posix(),
                    "label": CLASS_NAMES.index(class_folder.class_name),
                    "class_name": class_folder.class_name,
                    "patient_id": parse_patient(path.name)[0],
                    "sha256": info["sha256"],
                }
            )
    return rows, excluded


def _class_counts(name: str, folder: Path, rows: list[dict[str, Any]], excluded: list[dict[str, str]]) -> list[int]:
    """[NORMAL, PNEUMONIA] image counts; a set missing either class is refused (no AUC without both)."""
    counts = [sum(r["label"] == c for r in rows) for c in (0, 1)]
    if min(counts) == 0:
        raise DataError(
            f"evaluate.external.{name}: {folder} needs readable images of both classes "
            f"(found {counts[0]} NORMAL, {counts[1]} PNEUMONIA, {len(excluded)} unreadable)"
        )
    return counts


def _write_index(rows: list[dict[str, Any]], csv_path: Path) -> None:
    """Write the rows as CSV, atomically (a temporary file renamed into place)."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = csv_path.with_name(f".{csv_path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(csv_path)


def index_external(
    name: str,
    folder: str | Path,
    out_dir: str | Path = EXTERNAL_DIR,
    splits_csv: str | Path = HERE.splits,
    extra_roots: Sequence[str] = (),
) -> dict[str, Any]:
    """Index one labelled folder: every image decode-checked and hashed; unreadable files listed.

    Args:
        name: the set's name in ``evaluate.external``.
        folder: ``{NORMAL,PNEUMONIA}/`` or Kaggle layout (split folders are pooled).
        out_dir: where ``<name>.csv`` and ``<name>.json`` are written.
        splits_csv: the split file, to report identical files and shared patients with the train
            and validation splits.
        extra_roots: ``data.link_roots``: where links in the folder may lead, besides the folder
            and its DVC cache.

    Returns:
        The summary written to ``<name>.json``.
    """
    folder, out_dir = Path(folder), Path(out_dir)
    rows, excluded = _index_rows(folder, extra_roots)
    counts = _class_counts(name, folder, rows, excluded)
    csv_path = out_dir / f"{name}.csv"
    _write_index(rows, csv_path)
    summary = {
        "name": name,
        "folder": folder.as_posix(),
        "images": len(rows),
        "class_counts": {"NORMAL": counts[0], "PNEUMONIA": counts[1]},
        "prevalence": round(counts[1] / len(rows), 4),
        "patients_named": len({r["patient_id"] for r in rows if r["patient_id"]}),
        "excluded": excluded,
        "content_sha256": tree_digest((r["path"], r["sha256"]) for r in rows),
        "index_sha256": sha256_file(csv_path),
        "overlap_with_training": _training_overlap(rows, Path(splits_csv)),
    }
    write_json(out_dir / f"{name}.json", summary)
    _log_index(name, folder, summary)
    return summary


def _log_index(name: str, folder: Path, summary: Mapping[str, Any]) -> None:
    """One line on what was indexed; a warning when files are byte-identical to training images."""
    counts = summary["class_counts"]
    log.info(
        "external %s: %d images (%d NORMAL, %d PNEUMONIA) from %s, %d unreadable excluded",
        name,
        summary["images"],
        counts["NORMAL"],
        counts["PNEUMONIA"],
        folder,
        len(summary["excluded"]),
    )
    overlap = summary["overlap_with_training"]
    if overlap.get("identical_files"):
        log.warning(
            "external %s: %d files are byte-identical to training images: its figures are not external",
            name,
            overlap["identical_files"],
        )


def load_external(
    name: str, folder: str | Path, out_dir: str | Path = EXTERNAL_DIR, verify: bool = True
) -> ExternalSet:
    """The indexed set ``name``; indexes it first when no index exists (a CLI run without DVC).

    With ``verify``, every listed file is re-hashed: an index that no longer describes the folder
    is refused (``dvc repro`` or ``cxr external`` rebuilds it).

    Args:
        name: the set's name in ``evaluate.external``.
        folder: the set's folder (only read when the set has no index yet).
        out_dir: where the index ``<name>.csv`` is.
        verify: re-hash every listed file against the index.

    Returns:
        The set's paths, labels, patient ids and hashes, in index order.
    """
    csv_path = Path(out_dir) / f"{name}.csv"
    if not csv_path.is_file():
        index_external(name, folder, out_dir)
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if verify:
        for row in rows:
            path = Path(row["path"])
            if not path.is_file() or sha256_file(path) != row["sha256"]:
                raise DataError(
                    f"{csv_path}: {path} is missing or changed since the set was indexed; "
                    f"run `cxr external --name {name}` (dvc repro does it)"
                )
    return ExternalSet(
        name,
        [r["path"] for r in rows],
        np.asarray([int(r["label"]) for r in rows]),
        [r["patient_id"] for r in rows],
        [r["sha256"] for r in rows],
    )


def external_summary(name: str, out_dir: str | Path = EXTERNAL_DIR) -> dict[str, Any]:
    """The summary :func:`index_external` wrote for ``name`` (``<name>.json``); empty when there is none."""
    path = Path(out_dir) / f"{name}.json"
    return load_json_bounded(path, "external-set record") if path.is_file() else {}
