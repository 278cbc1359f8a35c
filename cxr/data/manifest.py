"""The manifest: one row per image under ``data/raw`` with label, patient, hash and geometry.

Images are listed with ``imutils.paths.list_images`` (as the original notebook did) in sorted
order, and probed in a small thread pool that streams results, so memory does not grow with
the image bytes.

Patient ids come from the file names of the Kermany dataset:
- ``person<N>_(bacteria|virus)_<M>[...]`` → ``person<N>``, subtype ``bacteria``/``virus``;
- normal images ``IM-<S>-<I>[...]`` and ``NORMAL2-IM-<S>-<I>[...]`` → ``IM-<S>``. ``<S>`` is the
  study number and ``<I>`` the image within it. The two batches reuse study numbers (211 collide
  in the train split) and nothing says whether they are the same child, so we group them: a split
  that over-groups only loses a little balance, one that under-groups leaks patients.
- any other name → no patient id (empty); such an image is its own group.
"""

from __future__ import annotations

import logging
import os
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from imutils import paths as imutils_paths

from cxr import CLASS_NAMES, SPLITS
from cxr.common.images import ImageLimits, probe
from cxr.files import TABLE_FILE, require_regular
from cxr.logs import progress

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "path",
    "label",
    "class_name",
    "source_split",
    "patient_id",
    "subtype",
    "sha256",
    "bytes",
    "width",
    "height",
    "channels",
    "format",
]

_PNEUMONIA = re.compile(r"^(person\d+)_(bacteria|virus)_\d+", re.IGNORECASE)
_NORMAL = re.compile(r"^(?:NORMAL\d*-)?(IM-\d+)-\d+", re.IGNORECASE)


def parse_patient(file_name: str) -> tuple[str, str]:
    """``(patient_id, subtype)`` from a Kermany file name; empty strings when unknown.

    Args:
        file_name: the file's name (not its path), e.g. ``person1_bacteria_1.jpeg``.

    Returns:
        ``("person1", "bacteria")`` for a pneumonia name (lowercase), ``("IM-0115", "")`` for a
        normal one (uppercase; ``NORMAL2-IM-…`` maps to the same id), ``("", "")`` otherwise.
    """
    if match := _PNEUMONIA.match(file_name):
        return match.group(1).lower(), match.group(2).lower()
    if match := _NORMAL.match(file_name):
        return match.group(1).upper(), ""
    return "", ""


def classify_path(rel: Path) -> tuple[str, str] | None:
    """``(source_split, CLASS)`` from a path relative to the raw root, or None if outside a class.

    Args:
        rel: the file's path relative to ``data/raw``: ``[<split>/]<CLASS>/.../<file>``.

    Returns:
        The split folder (``train``/``val``/``test``, or "" when there is none) and the canonical
        class name; None when the file is not inside a ``NORMAL``/``PNEUMONIA`` folder (names
        matched in any case).
    """
    parts = rel.parts
    split = ""
    if parts and parts[0].lower() in SPLITS:
        split, parts = parts[0].lower(), parts[1:]
    if len(parts) < 2:
        return None
    class_name = parts[0].upper()
    return (split, class_name) if class_name in CLASS_NAMES else None


def list_files(raw_dir: Path) -> tuple[list[Path], list[Path]]:
    """(images by extension, other visible files), both sorted.

    Args:
        raw_dir: the folder to list, recursively.

    Returns:
        The files ``imutils`` counts as images (by extension, as the notebook listed them), and every
        other file with no hidden (dot) folder or name in its path below ``raw_dir``.
    """
    images = sorted(Path(p) for p in imutils_paths.list_images(str(raw_dir)))
    image_set = set(images)
    others = sorted(
        p
        for p in raw_dir.rglob("*")
        if p.is_file() and p not in image_set and not any(part.startswith(".") for part in p.relative_to(raw_dir).parts)
    )
    return images, others


def _probe_many(files: list[Path], workers: int, limits: ImageLimits) -> Iterator[dict[str, Any]]:
    """Probe files in order with a bounded window of threads (flat memory for any file count).

    Threads, not processes: Pillow's decoders and hashlib release the GIL, and a process pool
    would re-import the caller (Prefect, TensorFlow) in every worker. Each probe decodes at most
    ``limits`` worth of pixels, so the window's memory is bounded too.
    """
    check = partial(probe, limits=limits)
    if workers <= 1:
        yield from map(check, files)
        return
    window: deque[Future[dict[str, Any]]] = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for file in files:
            window.append(pool.submit(check, file))
            if len(window) >= workers * 16:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def build_manifest(
    raw_dir: str | Path, workers: int = 0, path_prefix: str | None = None, limits: ImageLimits | None = None
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Probe every file under ``raw_dir``; return (manifest of usable images, excluded files).

    Every image is fully decoded and hashed (:func:`cxr.common.images.probe`); a file is excluded
    when its name is not an image's, it lies outside a class folder, it is over a decode cap
    (checked from its size and header before it is decoded), or it does not decode.

    Args:
        raw_dir: the images in Kaggle layout.
        workers: threads probing files at once; 0 uses one per CPU.
        path_prefix: what ``path`` in the manifest starts with, in place of ``raw_dir`` (default:
            the path as given, e.g. ``data/raw/...``, readable from the repository root).
        limits: the decode caps (``input.max_image_pixels`` / ``max_image_bytes``; default: their
            defaults).

    Returns:
        The manifest (``MANIFEST_COLUMNS``, one row per usable image, in sorted path order) and the
        excluded files as ``{path, reason}``.
    """
    raw_dir = Path(raw_dir)
    prefix = Path(path_prefix) if path_prefix is not None else raw_dir
    images, others = list_files(raw_dir)
    excluded = [
        {"path": (prefix / p.relative_to(raw_dir)).as_posix(), "reason": "not an image file name"} for p in others
    ]
    workers = workers or os.cpu_count() or 1
    rows: list[dict[str, Any]] = []
    probes = _probe_many(images, workers, limits or ImageLimits.of())
    for file, info in zip(images, progress(probes, len(images), "probe"), strict=True):
        rel = file.relative_to(raw_dir)
        shown = (prefix / rel).as_posix()
        where = classify_path(rel)
        if where is None:
            excluded.append({"path": shown, "reason": "not inside a NORMAL/ or PNEUMONIA/ folder"})
            continue
        if "error" in info:
            excluded.append({"path": shown, "reason": info["error"]})
            continue
        split, class_name = where
        patient, subtype = parse_patient(file.name)
        rows.append(
            {
                "path": shown,
                "label": CLASS_NAMES.index(class_name),
                "class_name": class_name,
                "source_split": split,
                "patient_id": patient,
                "subtype": subtype,
                **{k: info[k] for k in ("sha256", "bytes", "width", "height", "channels", "format")},
            }
        )
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    log.info("manifest: %d usable images, %d excluded", len(manifest), len(excluded))
    return manifest, excluded


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Load a manifest written by ``prepare`` with stable dtypes (ids stay strings).

    Args:
        path: ``manifest.csv`` (or ``splits.csv``, which shares its id columns).

    Returns:
        The frame; empty ``patient_id``, ``subtype`` and ``source_split`` stay "" rather than NaN.
    """
    require_regular(path, "manifest", TABLE_FILE)  # not a device or FIFO, and bounded
    return pd.read_csv(path, dtype={"patient_id": str, "subtype": str, "source_split": str}, keep_default_na=False)
