"""Reader agreement: the model against each radiologist, and the radiologists together.

Input: a CSV with one row per image, a key column (``path`` or ``image``) and one column per
reader holding 0/1 or NORMAL/PNEUMONIA. Cohen's kappa for the model against each reader and for
every reader pair, Fleiss' kappa across readers; 95 % intervals by bootstrap over images.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import cohen_kappa_score

from cxr.config import EvaluateConfig, as_section
from cxr.errors import DataError
from cxr.evaluation.metrics import interval
from cxr.workspace import HERE

_LABELS = {"0": 0, "1": 1, "normal": 0, "pneumonia": 1, "pn": 1}
KEY_COLUMNS = ("path", "image", "file", "filename")


def fleiss_kappa(ratings: np.ndarray) -> float:
    """Fleiss' kappa for an (images × readers) matrix of 0/1 labels.

    Args:
        ratings: (N images, R readers) 0/1 labels, R ≥ 2.

    Returns:
        Fleiss' kappa; 1.0 when every label is the same class (chance agreement is then 1).
    """
    n_items, n_raters = ratings.shape
    counts = np.stack([(ratings == c).sum(axis=1) for c in (0, 1)], axis=1).astype(float)
    p_item = ((counts * (counts - 1)).sum(axis=1)) / (n_raters * (n_raters - 1))
    p_bar = p_item.mean()
    p_class = counts.sum(axis=0) / (n_items * n_raters)
    p_e = float((p_class**2).sum())
    return float((p_bar - p_e) / (1 - p_e)) if p_e < 1 else 1.0


def read_readers(path: str | Path) -> tuple[pd.Series, pd.DataFrame]:
    """(image keys, readers' 0/1 labels) from a readers CSV; DataError on anything ambiguous.

    The key column is the first named ``path``, ``image``, ``file`` or ``filename`` (any case);
    every other column is a reader. Labels are read as ``0``/``1``/``normal``/``pneumonia``/``pn``
    in any case, spaces stripped.

    Args:
        path: the readers CSV, one row per image.

    Returns:
        The key column, and one int 0/1 column per reader (same row order).

    Raises:
        DataError: no key column, no reader column, or a cell that is not a known label (its row
            and column are named).
    """
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    key = next((c for c in frame.columns if c.lower() in KEY_COLUMNS), None)
    if key is None:
        raise DataError(f"{path}: needs a key column named one of {', '.join(KEY_COLUMNS)}")
    readers = [c for c in frame.columns if c != key]
    if not readers:
        raise DataError(f"{path}: no reader columns besides {key!r}")
    labels = frame[readers].apply(lambda col: col.str.strip().str.lower().map(_LABELS))
    bad = labels.isna()
    if bad.any().any():
        row, column = np.argwhere(bad.to_numpy())[0]
        raise DataError(
            f"{path}: row {row + 2}, column {readers[column]!r}: "
            f"{frame[readers[column]].iloc[row]!r} is not 0/1/NORMAL/PNEUMONIA"
        )
    return frame[key], labels.astype(int)


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
        (``kappa``, ``ci95``; None with fewer than two readers). ``ci95`` is None when fewer than
        10 resamples are usable.
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
        samples = np.array(
            [cohen_kappa_score(a[idx], b[idx]) if len(set(a[idx]) | set(b[idx])) > 1 else np.nan for idx in boots]
        )
        result["cohen"].append({"pair": name, "kappa": float(cohen_kappa_score(a, b)), "ci95": interval(samples)})
    if len(columns) >= 2:
        samples = np.array([fleiss_kappa(matrix[idx]) for idx in boots])
        result["fleiss"] = {"kappa": fleiss_kappa(matrix), "ci95": interval(samples)}
    return result


def agreement_for_report(
    readers_csv: str | Path,
    model: str,
    eval_params: EvaluateConfig | Mapping[str, Any],
    out: str | Path,
    eval_dir: str | Path = HERE.eval,
) -> dict[str, Any]:
    """Agreement of ``model`` (its test predictions at ``evaluate.threshold``) with the readers.

    Reader rows are matched to predictions by path, or by file name when paths differ. The model's
    labels use the fixed ``evaluate.threshold``, not its shipped operating point.

    Args:
        readers_csv: the readers CSV (see :func:`read_readers`).
        model: the model name; its test predictions are read from
            ``<eval_dir>/<model>/predictions.csv`` (written by ``evaluate``).
        eval_params: the ``evaluate`` section: ``threshold``, ``bootstrap``, ``seed``.
        out: the JSON file the result is written to.
        eval_dir: the evaluation reports folder.

    Returns:
        The :func:`agreement` result, as written to ``out``.

    Raises:
        DataError: the readers CSV is malformed, or some of its images are not in the model's test
            predictions.
    """
    from cxr.files import write_json

    keys, readers = read_readers(readers_csv)
    predictions = pd.read_csv(Path(eval_dir) / model / "predictions.csv", keep_default_na=False)
    evaluate = as_section(EvaluateConfig, eval_params, "evaluate")
    threshold = evaluate.threshold
    by_path = dict(zip(predictions["path"], predictions["probability"], strict=True))
    by_name = {Path(p).name: q for p, q in by_path.items()}
    probs = [by_path.get(k, by_name.get(Path(k).name)) for k in keys]
    missing = [k for k, p in zip(keys, probs, strict=True) if p is None]
    if missing:
        raise DataError(
            f"{readers_csv}: {len(missing)} image(s) are not in {model}'s test predictions, e.g. {missing[0]!r}"
        )
    labels = (np.asarray(probs, dtype=float) >= threshold).astype(int)
    result = agreement(readers, {"name": model, "labels": labels}, evaluate.bootstrap, evaluate.seed)
    write_json(Path(out), result)
    return result
