"""The ``evaluate`` step's DVC plot data: ROC, precision–recall, reliability and confusion, per model
and data set, in one folder per kind so that ``dvc.yaml`` can declare each folder once.

Layout (``<eval>`` is ``reports/eval``; ``<set>`` is ``test`` or ``external-<name>``)::

    <eval>/curves/roc/<set>/<model>.csv          fpr, tpr, threshold
    <eval>/curves/pr/<set>/<model>.csv           recall, precision
    <eval>/curves/calibration/<set>/<model>.csv  mean_predicted, fraction_positive, count
    <eval>/curves/confusion/<set>/<model>.csv    actual, predicted (one row per image, at the shipped threshold)

The files are rebuilt from the ``predictions.csv`` each model's evaluation wrote and the shipped
threshold in the summary, so a model that is no longer evaluated leaves no stale plot behind. They are
small and kept in git (``cache: false``), which is what ``dvc plots diff`` needs to compare commits
and experiments; ``dvc.yaml``'s top-level ``plots:`` (generated from :data:`PLOTS`) names the
templates and axes.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxr import CLASS_NAMES
from cxr.files import write_csv_rows

if TYPE_CHECKING:
    import numpy as np

# numpy, scikit-learn and the metrics are imported where used: the stage registry (cxr.stages) reads
# PLOTS and dvc_plot_definitions() to write dvc.yaml, and stays quick to import.

CURVES = "curves"

# kind → (x field, y field, DVC template, title, x label, y label)
PLOTS: dict[str, tuple[str, str, str, str, str, str]] = {
    "roc": ("fpr", "tpr", "simple", "ROC", "1 − specificity (false positive rate)", "sensitivity (true positive rate)"),
    "pr": ("recall", "precision", "simple", "Precision–recall", "recall (sensitivity)", "precision (PPV)"),
    "calibration": (
        "mean_predicted",
        "fraction_positive",
        "linear",
        "Reliability",
        "mean predicted P(pneumonia)",
        "observed fraction with pneumonia",
    ),
    "confusion": ("actual", "predicted", "confusion", "Confusion at the shipped threshold", "actual", "predicted"),
}


def _read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of one ``predictions.csv`` (``path,label,patient_id,probability``)."""
    import numpy as np

    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = np.asarray([int(r["label"]) for r in rows], dtype=int)
    probs = np.asarray([float(r["probability"]) for r in rows], dtype=float)
    return labels, probs


def curve_rows(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, tuple[list[str], list[tuple]]]:
    """The four tables of one model on one data set.

    Args:
        labels: (N,) truth, 0 normal or 1 pneumonia.
        probs: (N,) P(pneumonia).
        threshold: the shipped threshold (a probability at or above it reads as pneumonia).

    Returns:
        ``{kind: (header, rows)}`` for ``roc``, ``pr``, ``calibration`` and ``confusion``; the curves
        are empty when the set holds a single class (they are undefined there).
    """
    import numpy as np
    from sklearn.metrics import precision_recall_curve, roc_curve

    from cxr.common.metrics import calibration_bins

    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=float)
    predicted = (probs >= threshold).astype(int)
    tables: dict[str, tuple[list[str], list[tuple]]] = {
        "confusion": (
            ["actual", "predicted"],
            [(CLASS_NAMES[a], CLASS_NAMES[p]) for a, p in zip(labels, predicted, strict=True)],
        ),
        "calibration": (
            ["mean_predicted", "fraction_positive", "count"],
            [
                (round(b["mean_predicted"], 5), round(b["fraction_positive"], 5), b["count"])
                for b in calibration_bins(labels, probs)
            ],
        ),
        "roc": (["fpr", "tpr", "threshold"], []),
        "pr": (["recall", "precision"], []),
    }
    if len(set(labels.tolist())) == 2:
        fpr, tpr, thr = roc_curve(labels, probs)
        tables["roc"][1].extend(
            (round(float(a), 5), round(float(b), 5), round(min(float(c), 1.0), 5))
            for a, b, c in zip(fpr, tpr, thr, strict=True)
        )
        precision, recall, _ = precision_recall_curve(labels, probs)
        tables["pr"][1].extend((round(float(r), 5), round(float(p), 5)) for r, p in zip(recall, precision, strict=True))
    return tables


def _scored_sets(out_dir: Path, summary: Mapping[str, Any]) -> list[tuple[str, str, Path, float]]:
    """``(set, model, predictions.csv, shipped threshold)`` for every model on the test split and external sets."""
    found = [
        ("test", model, out_dir / model / "predictions.csv", float(m["threshold"]))
        for model, m in (summary.get("models") or {}).items()
    ]
    for name, ext in (summary.get("external") or {}).items():
        found += [
            (f"external-{name}", model, out_dir / model / f"external-{name}" / "predictions.csv", float(m["threshold"]))
            for model, m in (ext.get("models") or {}).items()
        ]
    return found


def write_plot_data(out_dir: str | Path, summary: Mapping[str, Any]) -> list[Path]:
    """Rewrite ``<out_dir>/curves/`` from the evaluation just written.

    Args:
        out_dir: the evaluation folder (``reports/eval``), holding ``<model>/predictions.csv`` and
            ``<model>/external-<set>/predictions.csv``.
        summary: the evaluation summary (``reports/metrics.json``): the models scored and their
            shipped thresholds, on the test split and on each external set.

    Returns:
        The files written.
    """
    out_dir = Path(out_dir)
    root = out_dir / CURVES
    shutil.rmtree(root, ignore_errors=True)
    written = []
    for set_name, model, predictions, threshold in _scored_sets(out_dir, summary):
        if not predictions.is_file():
            continue
        labels, probs = _read_predictions(predictions)
        for kind, (header, rows) in curve_rows(labels, probs, threshold).items():
            path = root / kind / set_name / f"{model}.csv"
            write_csv_rows(path, header, rows)
            written.append(path)
    return written


def dvc_plot_definitions(eval_dir: str = "reports/eval") -> list[dict[str, dict[str, str]]]:
    """The top-level ``plots:`` entries of ``dvc.yaml``: one per kind, a folder whose every file is a plot.

    Args:
        eval_dir: the evaluation folder, relative to ``dvc.yaml``.

    Returns:
        ``[{"<eval_dir>/curves/<kind>": {template, x, y, title, x_label, y_label}}, ...]``.
    """
    return [
        {
            f"{eval_dir}/{CURVES}/{kind}": {
                "template": template,
                "x": x,
                "y": y,
                "title": title,
                "x_label": x_label,
                "y_label": y_label,
            }
        }
        for kind, (x, y, template, title, x_label, y_label) in PLOTS.items()
    ]
