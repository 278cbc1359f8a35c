"""Training health: catch a collapsed or degenerate model before anyone ships it.

Measured on the shared data, the notebook's exact SmallNet recipe (Adam 1e-2) collapsed to
"pneumonia" for every image: validation AUC 0.500 from epoch 1 to 7. A retraining pipeline must
say so loudly and refuse (or fall back), never save such a model silently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from cxr.config import HealthConfig


@dataclass
class Health:
    status: str  # healthy | collapsed | degenerate
    problems: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """The figures the health check reads, on one labelled set at one threshold.

    Args:
        labels: (N,) truth, 0 normal or 1 pneumonia.
        probabilities: (N,) P(pneumonia); a NaN counts as a NORMAL prediction.
        threshold: the probability at or above which an image is called PNEUMONIA.

    Returns:
        ``n``, ``threshold``, ``auc`` (None unless both classes are present and every probability
        is finite), ``accuracy``, ``sensitivity``, ``specificity``, ``precision``,
        ``predicted_positive_fraction`` (ratios rounded to 4 digits, None when undefined),
        ``prediction_std`` (NaNs ignored; None when no probability is finite) and ``confusion``
        (``tn``, ``fp``, ``fn``, ``tp``).
    """
    labels = np.asarray(labels).astype(int)
    finite = np.isfinite(probabilities)
    predicted = (probabilities >= threshold).astype(int)
    tp = int(((predicted == 1) & (labels == 1)).sum())
    tn = int(((predicted == 0) & (labels == 0)).sum())
    fp = int(((predicted == 1) & (labels == 0)).sum())
    fn = int(((predicted == 0) & (labels == 1)).sum())

    def ratio(a: int, b: int) -> float | None:
        return round(a / b, 4) if b else None

    auc = None
    if finite.all() and len(set(labels.tolist())) == 2:
        auc = round(float(roc_auc_score(labels, probabilities)), 4)
    return {
        "n": len(labels),
        "threshold": threshold,
        "auc": auc,
        "accuracy": ratio(tp + tn, len(labels)),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "precision": ratio(tp, tp + fp),
        "predicted_positive_fraction": ratio(tp + fp, len(labels)),
        "prediction_std": round(float(np.nanstd(probabilities)), 5) if finite.any() else None,
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


def assess(
    labels: np.ndarray, probabilities: np.ndarray, history: Mapping[str, list[float]], cfg: HealthConfig
) -> Health:
    """Classify a trained model as healthy, collapsed (NaN / constant output) or degenerate.

    Collapsed: a NaN or infinite loss in the history or a non-finite prediction, or a prediction
    spread below ``min_prediction_std``. Degenerate: one class predicted for every image (at 0.5),
    or an AUC below ``min_val_auc``.

    Args:
        labels: (N,) validation truth, 0 normal or 1 pneumonia.
        probabilities: (N,) the model's validation P(pneumonia).
        history: Keras' training history; every series whose name ends in ``loss`` is checked.
        cfg: ``train.common.health``: ``min_prediction_std`` and ``min_val_auc``.

    Returns:
        The :class:`Health`: ``status`` (``collapsed`` wins over ``degenerate``), every problem found
        as one phrase, and the :func:`binary_metrics` at 0.5.
    """
    metrics = binary_metrics(labels, probabilities)
    collapsed, degenerate = [], []
    losses = [v for k, vs in history.items() if k.endswith("loss") for v in vs]
    if any(not math.isfinite(v) for v in losses) or not np.isfinite(probabilities).all():
        collapsed.append("loss or predictions became NaN")
    std = metrics["prediction_std"]
    if std is not None and std < cfg.min_prediction_std:
        collapsed.append(f"constant predictions (std {std:.5f} < {cfg.min_prediction_std})")
    fraction = metrics["predicted_positive_fraction"]
    if fraction in (0.0, 1.0) and np.isfinite(probabilities).all():
        label = "PNEUMONIA" if fraction == 1.0 else "NORMAL"
        degenerate.append(f"predicts {label} for every validation image")
    if metrics["auc"] is not None and metrics["auc"] < cfg.min_val_auc:
        degenerate.append(f"validation AUC {metrics['auc']:.3f} < {cfg.min_val_auc}")
    status = "collapsed" if collapsed else "degenerate" if degenerate else "healthy"
    return Health(status, collapsed + degenerate, metrics)
