"""Clinical metrics with patient-level bootstrap confidence intervals (numpy + scikit-learn only).

scikit-learn is imported inside the functions that use it (its import costs seconds), so a command
that needs only :func:`interval` (``cxr agreement``) starts quickly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b else None


def at_threshold(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, Any]:
    """Everything a clinical reader expects at one operating threshold.

    Args:
        labels: (N,) truth, 0 normal or 1 pneumonia.
        probabilities: (N,) P(pneumonia).
        threshold: the probability at or above which an image is called PNEUMONIA.

    Returns:
        ``threshold``, ``accuracy``, ``sensitivity``, ``specificity``, ``ppv``, ``npv``, ``f1``,
        ``balanced_accuracy`` (each None when its denominator is zero) and ``confusion`` (``tn``,
        ``fp``, ``fn``, ``tp``).
    """
    from sklearn.metrics import confusion_matrix

    labels = np.asarray(labels).astype(int)
    predicted = (np.asarray(probabilities) >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(labels, predicted, labels=[0, 1]).ravel())
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    ppv, npv = _ratio(tp, tp + fp), _ratio(tn, tn + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "threshold": float(threshold),
        "accuracy": _ratio(tp + tn, len(labels)),
        "sensitivity": sens,
        "specificity": spec,
        "ppv": ppv,
        "npv": npv,
        "f1": f1,
        "balanced_accuracy": (sens + spec) / 2 if sens is not None and spec is not None else None,
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


def threshold_free(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """The figures that need no threshold.

    Args:
        labels: (N,) truth, 0 normal or 1 pneumonia.
        probabilities: (N,) P(pneumonia).

    Returns:
        ``auc`` (ROC) and ``average_precision`` (None unless both classes are present), ``brier``
        (mean squared error of the probabilities), ``n`` and ``positives``.
    """
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

    both = len(set(np.asarray(labels).astype(int).tolist())) == 2
    return {
        "auc": float(roc_auc_score(labels, probabilities)) if both else None,
        "average_precision": float(average_precision_score(labels, probabilities)) if both else None,
        "brier": float(brier_score_loss(labels, probabilities)),
        "n": len(labels),
        "positives": int(np.sum(labels)),
    }


def youden_threshold(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity − 1 (choose it on validation only).

    Args:
        labels: (N,) truth, 0 normal or 1 pneumonia; both classes must be present.
        probabilities: (N,) P(pneumonia).

    Returns:
        The ROC threshold with the largest Youden's J, clamped to [0, 1] (sklearn's "nothing
        positive" point becomes 1.0); the first such threshold, the highest, on a tie.
    """
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(labels, probabilities)
    best = int(np.argmax(tpr - fpr))
    return float(min(max(thresholds[best], 0.0), 1.0))


def sensitivity_threshold(labels: np.ndarray, probabilities: np.ndarray, target: float) -> float:
    """The highest threshold at which sensitivity is still at least ``target`` (choose it on validation).

    A screening operating point: fix how many pneumonias may be missed, then call as few healthy
    children positive as that allows.

    Args:
        labels: (N,) truth, 0 normal or 1 pneumonia.
        probabilities: (N,) P(pneumonia).
        target: the sensitivity to keep, a fraction in (0, 1].

    Returns:
        The (k+1)-th lowest P(pneumonia) among the positive cases, k = ``floor((1 − target) ·
        positives)``: at most k positives score below it and are missed.

    Raises:
        ValueError: there is no positive case.
    """
    positives = np.sort(np.asarray(probabilities, dtype=float)[np.asarray(labels).astype(int) == 1])
    if positives.size == 0:
        raise ValueError("no positive case to set a sensitivity target on")
    allowed_misses = int(np.floor((1.0 - target) * positives.size + 1e-9))
    return float(positives[min(allowed_misses, positives.size - 1)])


def _group_index(groups: Sequence[str]) -> list[np.ndarray]:
    order: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        order.setdefault(str(g) if g else f"__image{i}", []).append(i)
    return [np.asarray(v) for v in order.values()]


def bootstrap(
    labels: np.ndarray,
    probabilities: Sequence[np.ndarray],
    groups: Sequence[str],
    threshold: float,
    n_boot: int = 1000,
    seed: int = 42,
) -> list[dict[str, np.ndarray]]:
    """Resample *patients* with replacement; per model, arrays of AUC, sensitivity, specificity,
    accuracy over the resamples (paired: every model sees the same resamples).

    Images that share a patient id are drawn together, so the intervals reflect how many children
    were seen, not how many films; an image without an id is its own cluster.

    Args:
        labels: (N,) truth, 0 normal or 1 pneumonia.
        probabilities: one (N,) P(pneumonia) array per model, aligned with ``labels``.
        groups: (N,) patient ids ("" when unknown).
        threshold: the operating threshold for sensitivity, specificity and accuracy.
        n_boot: the number of resamples.
        seed: the resampling seed.

    Returns:
        Per model, ``{auc, sensitivity, specificity, accuracy}``, each (n_boot,) float; NaN for a
        resample that holds only one class.
    """
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(int)
    clusters = _group_index(groups)
    rng = np.random.default_rng(seed)
    out = [
        {k: np.full(n_boot, np.nan) for k in ("auc", "sensitivity", "specificity", "accuracy")} for _ in probabilities
    ]
    for b in range(n_boot):
        idx = np.concatenate([clusters[i] for i in rng.integers(0, len(clusters), len(clusters))])
        y = labels[idx]
        if y.min() == y.max():
            continue
        for m, probs in enumerate(probabilities):
            p = np.asarray(probs)[idx]
            pred = p >= threshold
            out[m]["auc"][b] = roc_auc_score(y, p)
            out[m]["sensitivity"][b] = pred[y == 1].mean()
            out[m]["specificity"][b] = (~pred[y == 0]).mean()
            out[m]["accuracy"][b] = (pred == y).mean()
    return out


def interval(samples: np.ndarray, level: float = 0.95) -> list[float] | None:
    """Percentile confidence interval of bootstrap samples.

    Args:
        samples: the bootstrap values (a NumPy array); NaN and infinite ones are dropped.
        level: the coverage, e.g. 0.95 for the 2.5th to 97.5th percentiles.

    Returns:
        ``[low, high]``; None when fewer than 10 finite samples are left.
    """
    finite = samples[np.isfinite(samples)]
    if finite.size < 10:
        return None
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))]


def paired_auc_test(
    samples_a: np.ndarray, samples_b: np.ndarray, auc_a: float | None, auc_b: float | None
) -> dict[str, Any]:
    """Paired patient-bootstrap test of AUC(a) − AUC(b): difference, 95 % CI, two-sided p.

    Args:
        samples_a, samples_b: the two models' bootstrap AUCs from one :func:`bootstrap` call (same
            resamples, same order).
        auc_a, auc_b: the two models' AUCs on the full set.

    Returns:
        ``auc_difference`` (a − b on the full set; None when either AUC is undefined), ``ci95`` of the
        resampled differences, ``p_value`` (twice the smaller of the shares of differences ≤ 0 and
        ≥ 0, kept within [1/resamples, 1]; None without finite resamples) and ``method``.
    """
    diff = samples_a - samples_b
    diff = diff[np.isfinite(diff)]
    p = None
    if diff.size:
        # two-sided bootstrap p; never reported below the resolution of the resampling (1/n)
        p = min(max(2 * min((diff <= 0).mean(), (diff >= 0).mean()), 1 / diff.size), 1.0)
    return {
        "auc_difference": auc_a - auc_b if auc_a is not None and auc_b is not None else None,
        "ci95": interval(diff),
        "p_value": float(p) if p is not None else None,
        "method": "paired bootstrap over patients",
    }


def calibration_bins(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Reliability table over equal-width bins [k/bins, (k+1)/bins); 1.0 falls in the last bin.

    Args:
        labels: (N,) truth, 0 normal or 1 pneumonia.
        probabilities: (N,) P(pneumonia).
        bins: the number of bins.

    Returns:
        One row per non-empty bin, in order: ``bin_low``, ``bin_high``, ``count``,
        ``mean_predicted`` and ``fraction_positive``.
    """
    labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=float)
    # integer bin index (floating edges from linspace would put 0.3 into the bin below)
    index = np.clip(np.floor(probabilities * bins + 1e-9).astype(int), 0, bins - 1)
    rows = []
    for k in range(bins):
        mask = index == k
        if mask.any():
            rows.append(
                {
                    "bin_low": k / bins,
                    "bin_high": (k + 1) / bins,
                    "count": int(mask.sum()),
                    "mean_predicted": float(probabilities[mask].mean()),
                    "fraction_positive": float(labels[mask].mean()),
                }
            )
    return rows
