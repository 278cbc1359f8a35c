"""Reader agreement: the model against each radiologist, and the radiologists together.

Input: a CSV with one row per image, a key column (``path`` or ``image``) and one column per
reader holding 0/1 or NORMAL/PNEUMONIA. Cohen's kappa for the model against each reader and for
every reader pair, Fleiss' kappa across readers; 95 % intervals by bootstrap over images.

A kappa is undefined when chance agreement is already 1 (every label in the comparison is the same
class): it is then None (``null`` in JSON, "undefined" in text), never NaN.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.common.metrics import interval
from cxr.common.thresholds import recorded_point
from cxr.config import EvaluateConfig
from cxr.errors import DataError
from cxr.files import TABLE_FILE, read_bounded
from cxr.safe_text import printable
from cxr.workspace import HERE

_LABELS = {"0": 0, "1": 1, "normal": 0, "pneumonia": 1, "pn": 1}
KEY_COLUMNS = ("path", "image", "file", "filename")
UNDEFINED = "undefined (every label is the same class, so chance agreement is already 1)"


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float | None:
    """Cohen's kappa of two raters' 0/1 labels; None when undefined.

    Args:
        a, b: (N,) 0/1 labels of the same images.

    Returns:
        (p_o − p_e) / (1 − p_e), as scikit-learn computes it; None when chance agreement p_e is 1
        (both raters gave every image the same class), where the ratio is 0/0.
    """
    a, b = np.asarray(a).astype(int), np.asarray(b).astype(int)
    if len(a) == 0:
        return None
    p_o = float((a == b).mean())
    pa, pb = float(a.mean()), float(b.mean())
    p_e = pa * pb + (1 - pa) * (1 - pb)
    if p_e >= 1 - 1e-12:
        return None
    return (p_o - p_e) / (1 - p_e)


def fleiss_kappa(ratings: np.ndarray) -> float | None:
    """Fleiss' kappa for an (images × readers) matrix of 0/1 labels.

    Args:
        ratings: (N images, R readers) 0/1 labels, R ≥ 2.

    Returns:
        Fleiss' kappa; None when undefined: every label is the same class (chance agreement is then
        1 and the ratio 0/0), like :func:`cohen_kappa`.
    """
    n_items, n_raters = ratings.shape
    if n_items == 0 or n_raters < 2:
        return None
    counts = np.stack([(ratings == c).sum(axis=1) for c in (0, 1)], axis=1).astype(float)
    p_item = ((counts * (counts - 1)).sum(axis=1)) / (n_raters * (n_raters - 1))
    p_bar = p_item.mean()
    p_class = counts.sum(axis=0) / (n_items * n_raters)
    p_e = float((p_class**2).sum())
    return float((p_bar - p_e) / (1 - p_e)) if p_e < 1 - 1e-12 else None


def _nan_if_none(value: float | None) -> float:
    return np.nan if value is None else value


def _read_text(path: str | Path) -> str:
    """The readers file as text; DataError naming it when it is missing, a folder, unreadable or binary."""
    shown = printable(path)
    if not Path(path).exists():
        raise DataError(f"{shown}: no such readers file; check the path")
    if Path(path).is_dir():
        raise DataError(f"{shown}: is a folder; give a readers CSV file")
    data = read_bounded(path, "readers CSV", TABLE_FILE)  # not a device or FIFO, and bounded
    if b"\0" in data:
        raise DataError(f"{shown}: binary content, not a CSV text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{shown}: not UTF-8 text; save the readers CSV as UTF-8") from None


def _refuse_duplicate_columns(text: str, shown: str) -> None:
    """pandas renames a repeated header (``r1``, ``r1.1``): a reader counted twice. Refuse it instead."""
    header = next(csv.reader(io.StringIO(text)), [])
    seen: set[str] = set()
    for name in (h.strip() for h in header):
        if name.lower() in seen:
            raise DataError(f"{shown}: column {printable(name)!r} appears twice in the header; name each reader once")
        seen.add(name.lower())


def read_readers(path: str | Path, min_readers: int = 1) -> tuple[pd.Series, pd.DataFrame]:
    """(image keys, readers' 0/1 labels) from a readers CSV; DataError on anything ambiguous.

    The key column is the first named ``path``, ``image``, ``file`` or ``filename`` (any case);
    every other column is a reader. Labels are read as ``0``/``1``/``normal``/``pneumonia``/``pn``
    in any case, spaces stripped.

    Args:
        path: the readers CSV, one row per image.
        min_readers: the fewest reader columns accepted (2 for agreement among readers alone).

    Returns:
        The key column, and one int 0/1 column per reader (same row order).

    Raises:
        DataError: the file is missing, a folder, binary, not UTF-8, empty, not parsable as CSV
            (an unclosed quote, say) or has no rows; no key column, too few reader columns, or a
            cell that is not a known label (its row and column are named). Always one line naming
            the file.
    """
    shown = printable(path)
    text = _read_text(path)
    frame = _parse_csv(text, shown)
    _refuse_duplicate_columns(text, shown)
    key = _key_column(frame, shown)
    readers = _reader_columns(frame, key, shown, min_readers)
    if frame.empty:
        raise DataError(f"{shown}: no rows below the header; add one row per image")
    return frame[key], _labels(frame, readers, shown)


def _parse_csv(text: str, shown: str) -> pd.DataFrame:
    """The CSV's cells as text (nothing read as NaN); DataError when it is empty or does not parse."""
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(
            f"{shown}: empty file; needs a header row (path,reader1,reader2,...) and one row per image"
        ) from None
    except (pd.errors.ParserError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{shown}: not a readable CSV ({printable(reason)})") from None


def _key_column(frame: pd.DataFrame, shown: str) -> str:
    """The image key column; DataError when there is none or an image appears in more than one row."""
    key = next((c for c in frame.columns if str(c).lower() in KEY_COLUMNS), None)
    if key is None:
        raise DataError(f"{shown}: needs a key column named one of {', '.join(KEY_COLUMNS)}")
    repeated = frame[key].str.strip().duplicated(keep=False)
    if repeated.any():
        rows = [int(i) + 2 for i in np.flatnonzero(repeated.to_numpy())[:4]]
        raise DataError(
            f"{shown}: image {printable(frame[key][repeated].iloc[0])!r} appears in more than one row "
            f"(rows {', '.join(map(str, rows))}); keep one row per image, or it is counted twice"
        )
    return key


def _reader_columns(frame: pd.DataFrame, key: str, shown: str, min_readers: int) -> list[str]:
    """Every column but the key; DataError when there are fewer than ``min_readers`` (or none)."""
    readers = [c for c in frame.columns if c != key]
    if not readers:
        raise DataError(f"{shown}: no reader columns besides {printable(key)!r}")
    if len(readers) < min_readers:
        raise DataError(
            f"{shown}: {len(readers)} reader column ({printable(readers[0])!r}); kappa needs at least "
            f"{min_readers} readers: add a column per reader"
        )
    return readers


def _labels(frame: pd.DataFrame, readers: list[str], shown: str) -> pd.DataFrame:
    """The readers' cells as int 0/1; DataError naming the row and column of the first unknown label."""
    labels = frame[readers].apply(lambda col: col.str.strip().str.lower().map(_LABELS))
    bad = labels.isna()
    if bad.any().any():
        row, column = np.argwhere(bad.to_numpy())[0]
        raise DataError(
            f"{shown}: row {row + 2}, column {printable(readers[column])!r}: "
            f"{printable(repr(frame[readers[column]].iloc[row]))} is not 0/1/NORMAL/PNEUMONIA"
        )
    return labels.astype(int)


def agreement(
    readers: pd.DataFrame, model: Mapping[str, Any] | None = None, n_boot: int = 1000, seed: int = 42
) -> dict[str, Any]:
    """Kappas with bootstrap CIs. ``model``: optional {'name': str, 'labels': array aligned to rows}.

    Cohen's kappa for the model against each reader and for every reader pair; Fleiss' kappa over
    all readers when there are at least two. Intervals resample images (not patients), the same
    resamples for every pair; a resample where a pair uses only one class is left out.

    Args:
        readers: one 0/1 column per reader, one row per image.
        model: the model's name and 0/1 labels for the same rows, or None for readers only.
        n_boot: bootstrap resamples.
        seed: the resampling seed.

    Returns:
        ``images``, ``readers``, ``cohen`` (per pair: ``pair``, ``kappa``, ``ci95``) and ``fleiss``
        (``kappa``, ``ci95``; None with fewer than two readers). A ``kappa`` is None when undefined
        (every label of the comparison is one class); ``ci95`` is None when fewer than 10 resamples
        are usable (resamples where it is undefined are left out).
    """
    rng = np.random.default_rng(seed)
    matrix = readers.to_numpy()
    columns = list(readers.columns)
    pairs: list[tuple[str, np.ndarray, np.ndarray]] = []
    if model is not None:
        pairs += [(f"{model['name']} vs {c}", np.asarray(model["labels"]), matrix[:, i]) for i, c in enumerate(columns)]
    pairs += [
        (f"{a} vs {b}", matrix[:, i], matrix[:, j]) for (i, a), (j, b) in itertools.combinations(enumerate(columns), 2)
    ]
    boots = [rng.integers(0, len(matrix), len(matrix)) for _ in range(n_boot)]
    result: dict[str, Any] = {"images": len(matrix), "readers": columns, "cohen": [], "fleiss": None}
    for name, a, b in pairs:
        samples = np.array([_nan_if_none(cohen_kappa(a[idx], b[idx])) for idx in boots], dtype=float)
        result["cohen"].append({"pair": name, "kappa": cohen_kappa(a, b), "ci95": interval(samples)})
    if len(columns) >= 2:
        samples = np.array([_nan_if_none(fleiss_kappa(matrix[idx])) for idx in boots], dtype=float)
        result["fleiss"] = {"kappa": fleiss_kappa(matrix), "ci95": interval(samples)}
    return result


def agreement_for_report(
    readers_csv: str | Path,
    model: str,
    eval_params: EvaluateConfig,
    out: str | Path,
    eval_dir: str | Path = HERE.eval,
) -> dict[str, Any]:
    """Agreement of ``model`` (its test predictions at its shipped threshold) with the readers.

    Reader rows are matched to predictions by path, or by file name when paths differ. The model's
    labels use the operating point ``evaluate`` recorded beside those predictions
    (``<eval_dir>/<model>/operating_point.json``: the shipped threshold, by
    ``evaluate.threshold_source``), as ``cxr predict`` would label the images.

    Args:
        readers_csv: the readers CSV (see :func:`read_readers`).
        model: the model name; its test predictions are read from
            ``<eval_dir>/<model>/predictions.csv`` (written by ``evaluate``).
        eval_params: the ``evaluate`` section: ``bootstrap``, ``seed``.
        out: the JSON file the result is written to.
        eval_dir: the evaluation reports folder.

    Returns:
        The :func:`agreement` result with the model's ``threshold`` (value, rule), as written to ``out``.

    Raises:
        DataError: the readers CSV is malformed, ``evaluate`` has not written the model's
            predictions and operating point, or some of the readers' images are not in them.
    """
    from cxr.files import write_json

    keys, readers = read_readers(readers_csv)
    predictions_csv = Path(eval_dir) / model / "predictions.csv"
    if not predictions_csv.is_file():
        raise DataError(f"{predictions_csv}: not found; run the evaluate step first (dvc repro evaluate)")
    predictions = pd.read_csv(predictions_csv, keep_default_na=False)
    point = recorded_point(model, eval_dir)  # the shipped threshold, as evaluate recorded it
    threshold = point.threshold
    by_path = dict(zip(predictions["path"], predictions["probability"], strict=True))
    by_name = {Path(p).name: q for p, q in by_path.items()}
    probs = [by_path.get(k, by_name.get(Path(k).name)) for k in keys]
    missing = [k for k, p in zip(keys, probs, strict=True) if p is None]
    if missing:
        raise DataError(
            f"{readers_csv}: {len(missing)} image(s) are not in {model}'s test predictions, e.g. {missing[0]!r}"
        )
    labels = (np.asarray(probs, dtype=float) >= threshold).astype(int)
    result = agreement(readers, {"name": model, "labels": labels}, eval_params.bootstrap, eval_params.seed)
    result["threshold"] = {"value": threshold, "rule": point.rule}
    result["out_of_domain"] = _out_of_domain(Path(eval_dir) / model / "domain.json", keys)
    write_json(Path(out), result)
    return result


def _out_of_domain(record: Path, keys: Iterable[str]) -> dict[str, Any] | None:
    """How many of the readers' images the model's content check flags (marked, not dropped: the
    readers read them), from the record ``evaluate`` wrote; None when the model has no check."""
    try:
        flagged = json.loads(record.read_text()).get("flagged_paths") or []
    except (OSError, ValueError, AttributeError):
        return None
    names = {Path(p).name for p in flagged}
    marked = [k for k in keys if k in flagged or Path(k).name in names]
    return {"images": len(marked), "paths": marked[:20]}
