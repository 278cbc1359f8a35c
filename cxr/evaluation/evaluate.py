"""The ``evaluate`` step: the metrics a clinical reader expects, with patient-level CIs, on the test
split and on every external validation set (``evaluate.external``).

Per model and data set: the notebook's classification report, confusion matrix and ROC/AUC, plus
sensitivity, specificity, PPV, NPV, F1, balanced accuracy, precision–recall, Brier score, expected
calibration error and a reliability curve, all at the model's *shipped threshold*; 95 % bootstrap
intervals that resample *patients* (seeded). The shipped threshold follows
``evaluate.threshold_source``: ``validation`` (the default: no outside data used; the model card's
operating point, chosen on the validation split at training time by Youden's J or, with
``train.common.target_sensitivity``, as the highest threshold that keeps that sensitivity),
``fixed`` (``evaluate.threshold``) or ``external:<name>`` (Youden's J on that external set; figures
on that same set are labelled as such). Figures at the validation Youden
threshold are reported beside, and on external sets also at the set's own Youden threshold
(labelled optimistic). Across models: a paired bootstrap test of the AUC difference per data set.
``cxr evaluate --model M --data DIR`` scores one model on any labelled folder.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import classification_report, precision_recall_curve, roc_curve

from cxr import CLASS_NAMES
from cxr.common import plots
from cxr.common.metrics import (
    at_threshold,
    bootstrap,
    calibration_bins,
    interval,
    paired_auc_test,
    threshold_free,
    youden_threshold,
)
from cxr.common.model_card import ModelCard
from cxr.common.thresholds import (
    operating_point,
    record_operating_point,
    threshold_rule,
    validation_point,
    validation_youden,
)
from cxr.config import EvaluateConfig, InputConfig
from cxr.data.external_sets import EXTERNAL_DIR, ExternalSet, external_sets, load_external
from cxr.data.kaggle_layout import find_class_folders
from cxr.data.manifest import parse_patient
from cxr.errors import DataError
from cxr.evaluation.set_roles import role_of, settings_digest
from cxr.files import write_csv_rows, write_json
from cxr.formatting import interval as interval_text
from cxr.formatting import num
from cxr.inference.loading import (
    LoadedModel,
    iter_images,
    load,
    load_image,
    model_file,
    predict_images,
)
from cxr.training.input_pipeline import load_images, read_split
from cxr.workspace import HERE

log = logging.getLogger(__name__)


def score(
    labels: np.ndarray,
    probabilities: np.ndarray,
    groups: Sequence[str],
    threshold: float,
    n_boot: int,
    seed: int,
    youden: float | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """All metrics of one model on one labelled set; also the bootstrap samples (for comparisons).

    Args:
        labels: (N,) truth, 0 normal or 1 pneumonia.
        probabilities: (N,) P(pneumonia).
        groups: (N,) patient ids ("" when unknown), the bootstrap's clusters.
        threshold: the operating threshold the headline figures are taken at.
        n_boot: bootstrap resamples of patients.
        seed: the bootstrap seed.
        youden: the validation Youden threshold, to report figures at it too; None to skip.

    Returns:
        The metrics (:func:`cxr.common.metrics.threshold_free`, ``at_threshold`` and its
        figures copied to the top level, ``ci95`` per bootstrap metric, ``ci_method``, the
        classification report, and ``youden_threshold`` / ``at_youden`` when given), and the
        bootstrap samples of AUC, sensitivity, specificity and accuracy.
    """
    labels = np.asarray(labels).astype(int)
    result: dict[str, Any] = {
        **threshold_free(labels, probabilities),
        "at_threshold": at_threshold(labels, probabilities, threshold),
    }
    samples = bootstrap(labels, [probabilities], groups, threshold, n_boot, seed)[0]
    result["ci95"] = {k: interval(v) for k, v in samples.items()}
    result["ci_method"] = f"{n_boot} bootstrap resamples of patients (seed {seed})"
    if youden is not None:
        result["youden_threshold"] = youden
        result["at_youden"] = at_threshold(labels, probabilities, youden)
    for key in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "balanced_accuracy"):
        result[key] = result["at_threshold"][key]
    result["classification_report"] = classification_report(
        labels,
        (probabilities >= threshold).astype(int),
        labels=[0, 1],
        target_names=["normal", "pn"],
        output_dict=True,
        zero_division=0,
    )
    return result, samples


def _curves(name: str, labels: np.ndarray, probs: np.ndarray, result: Mapping[str, Any], out: Path) -> None:
    """ROC, precision–recall and reliability curves (CSV and PNG) and the confusion matrix plot, into ``out``."""
    roc = roc_curve(labels, probs)
    precision, recall, _ = precision_recall_curve(labels, probs)
    bins = calibration_bins(labels, probs)
    _write_curve_tables(out, roc, (recall, precision), bins)
    _plot_curves(name, out, roc[:2], (recall, precision), bins, result)


def _write_curve_tables(
    out: Path,
    roc: tuple[np.ndarray, np.ndarray, np.ndarray],
    pr: tuple[np.ndarray, np.ndarray],
    bins: Sequence[Mapping[str, float]],
) -> None:
    """``roc.csv`` (fpr, tpr, threshold), ``pr.csv`` (recall, precision) and ``calibration.csv``."""
    fpr, tpr, thr = roc
    write_csv_rows(
        out / "roc.csv",
        ["fpr", "tpr", "threshold"],
        [(round(a, 5), round(b, 5), round(min(c, 1.0), 5)) for a, b, c in zip(fpr, tpr, thr, strict=True)],
    )
    recall, precision = pr
    write_csv_rows(
        out / "pr.csv",
        ["recall", "precision"],
        [(round(r, 5), round(p, 5)) for r, p in zip(recall, precision, strict=True)],
    )
    write_csv_rows(
        out / "calibration.csv",
        ["mean_predicted", "fraction_positive", "count"],
        [(round(b["mean_predicted"], 5), round(b["fraction_positive"], 5), b["count"]) for b in bins],
    )


def _plot_curves(
    name: str,
    out: Path,
    roc: tuple[np.ndarray, np.ndarray],
    pr: tuple[np.ndarray, np.ndarray],
    bins: Sequence[Mapping[str, float]],
    result: Mapping[str, Any],
) -> None:
    """``roc.png``, ``pr.png``, ``calibration.png`` and ``confusion.png`` (at the shipped threshold)."""
    auc = result["auc"] or float("nan")
    ap = result["average_precision"] or float("nan")
    plots.curve(
        *roc, out / "roc.png", f"{name}: ROC", "1 − specificity", "sensitivity", diagonal=True, label=f"AUC {auc:.3f}"
    )
    plots.curve(
        *pr,
        out / "pr.png",
        f"{name}: precision–recall",
        "recall (sensitivity)",
        "precision (PPV)",
        label=f"AP {ap:.3f}",
    )
    plots.curve(
        [b["mean_predicted"] for b in bins],
        [b["fraction_positive"] for b in bins],
        out / "calibration.png",
        f"{name}: reliability (Brier {result['brier']:.3f})",
        "mean predicted P(pneumonia)",
        "observed fraction with pneumonia",
        diagonal=True,
    )
    plots.confusion(
        result["at_threshold"]["confusion"],
        out / "confusion.png",
        f"{name} @ {result['at_threshold']['threshold']:.2f}",
    )


def _split_probabilities(
    lm: LoadedModel, splits_csv: Path, split: str, cache_dir: str
) -> tuple[tuple[list[str], np.ndarray, np.ndarray, list[str]], np.ndarray | None]:
    """((paths, labels, P(pneumonia), patient ids), the content check's scores or None) of one split,
    from one forward pass."""
    import pandas as pd

    cfg = lm.cached_input(cache_dir)
    paths, labels, key = read_split(splits_csv, split)
    images = load_images(paths, key, cfg, split)
    frame = pd.read_csv(splits_csv, keep_default_na=False, dtype={"patient_id": str})
    groups = frame.loc[frame["split"] == split, "patient_id"].tolist()
    probabilities, scores = lm.score(images)
    return (paths, labels, probabilities, groups), scores


@dataclass
class _Scored:
    """One model's probabilities on every data set it is scored on."""

    test: tuple[list[str], np.ndarray, np.ndarray, list[str]]
    val_youden: float
    val_point: dict[str, Any]
    external: dict[str, np.ndarray] = field(default_factory=dict)
    domain: dict[str, np.ndarray] = field(default_factory=dict)  # per set ("test", external), with a check


def domain_summary(scores: np.ndarray | None) -> dict[str, Any] | None:
    """How many images of a set the model's content check flags (score > 1), and their score spread.

    Args:
        scores: the set's domain scores (:meth:`cxr.inference.loading.LoadedModel.score`), or None.

    Returns:
        ``{n, flagged, share_flagged, median_score, p95_score}``, or None without a content check.
    """
    if scores is None or not len(scores):
        return None
    flagged = int(np.sum(scores > 1.0))
    return {
        "n": len(scores),
        "flagged": flagged,
        "share_flagged": round(flagged / len(scores), 4),
        "median_score": round(float(np.median(scores)), 4),
        "p95_score": round(float(np.percentile(scores, 95)), 4),
    }


def _score_model(
    lm: LoadedModel,
    splits_csv: Path,
    cache_dir: str,
    sets: Sequence[ExternalSet],
    decoded: dict[tuple[str, int, str, str], np.ndarray],  # by (set, image size, resize, interpolation)
    allow: bool = False,
) -> _Scored:
    """One model's probabilities on the validation and test splits and every external set
    (``allow``: score DICOMs outside the intended use instead of refusing them)."""
    (_, val_labels, val_probs, _), _ = _split_probabilities(lm, splits_csv, "val", cache_dir)
    test, test_scores = _split_probabilities(lm, splits_csv, "test", cache_dir)
    scored = _Scored(
        test=test,
        val_youden=youden_threshold(val_labels, val_probs),
        val_point=validation_point(lm.card, val_labels, val_probs),
        domain={} if test_scores is None else {"test": test_scores},
    )
    for ext in sets:
        key = (ext.name, lm.input.image_size, lm.input.resize, lm.input.interpolation)
        if key not in decoded:  # models sharing preprocessing (an ensemble and its members) decode once
            decoded[key] = np.stack([load_image(path, lm.input, allow) for path in ext.paths])
        scored.external[ext.name], domain = lm.score(decoded[key])
        if domain is not None:
            scored.domain[ext.name] = domain
    return scored


_SUMMARY_KEYS = (
    "auc",
    "accuracy",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "balanced_accuracy",
    "brier",
    "average_precision",
    "ci95",
    "youden_threshold",
    "n",
)


def _compact(result: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: result.get(k) for k in _SUMMARY_KEYS}
    out["threshold"] = result["at_threshold"]["threshold"]
    out["at_youden"] = {k: result["at_youden"][k] for k in ("sensitivity", "specificity", "accuracy")}
    out["calibration"] = result.get("calibration")
    return out


def _calibration(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Brier score and expected calibration error (10 equal-width bins)."""
    bins = calibration_bins(labels, probs)
    n = max(len(labels), 1)
    ece = sum(b["count"] / n * abs(b["mean_predicted"] - b["fraction_positive"]) for b in bins)
    return {"brier": float(np.mean((np.asarray(probs) - labels) ** 2)), "ece": float(ece)}


def _write_set(
    name: str,
    label: str,
    paths: Sequence[str],
    labels: np.ndarray,
    probs: np.ndarray,
    groups: Sequence[str],
    result: dict[str, Any],
    target: Path,
) -> None:
    rows = [(p, int(y), g, round(float(q), 6)) for p, y, g, q in zip(paths, labels, groups, probs, strict=True)]
    write_csv_rows(target / "predictions.csv", ["path", "label", "patient_id", "probability"], rows)
    _curves(f"{name} on {label}", labels.astype(int), probs, result, target)
    write_json(target / "metrics.json", result)


def _write_domain_record(target: Path, paths: Sequence[str], scores: np.ndarray | None) -> None:
    """``<model>/domain.json``: the test images the model's content check flags (for reader agreement)."""
    record = target / "domain.json"
    if scores is None:
        record.unlink(missing_ok=True)
        return
    flagged = [p for p, s in zip(paths, scores, strict=True) if s > 1.0]
    write_json(record, {**(domain_summary(scores) or {}), "flagged_paths": flagged})


def _empty_summary(
    eval_params: EvaluateConfig, sets: Sequence[ExternalSet], sets_cfg: Mapping[str, str]
) -> dict[str, Any]:
    """The ``metrics.json`` skeleton: settings, and empty per-model and comparison slots per data set."""
    return {
        "threshold": eval_params.threshold,
        "threshold_source": eval_params.threshold_source,
        "split": "test",
        "models": {},
        "comparison": [],
        "external": {
            ext.name: {
                "n": len(ext.labels),
                "prevalence": ext.prevalence,
                "folder": sets_cfg[ext.name],
                "models": {},
                "comparison": [],
            }
            for ext in sets
        },
    }


def _score_test(
    name: str, lm: LoadedModel, scored: _Scored, point: Mapping[str, Any], n_boot: int, seed: int, out_dir: Path
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One model on the test split at its shipped threshold; files under ``<out_dir>/<name>/``."""
    threshold = point["threshold"]
    paths, labels, probs, groups = scored.test
    result, samples = score(labels, probs, groups, threshold, n_boot, seed, scored.val_youden)
    result.update(
        model_sha256=lm.card.model_sha256,
        verified=lm.verified,
        health=lm.card.health.status if lm.card.health else None,
        operating_point=point,
        calibration=_calibration(labels, probs),
    )
    result["domain"] = domain_summary(scored.domain.get("test"))
    _write_set(name, "test", paths, labels, probs, groups, result, out_dir / name)
    record_operating_point(name, lm.card.model_sha256, point, out_dir)
    _write_domain_record(out_dir / name, paths, scored.domain.get("test"))
    log.info(
        "%s: test AUC %s (95%% CI %s), sensitivity %s, specificity %s at %s (%s)",
        name,
        num(result["auc"], 4),
        ci_text(result["ci95"]["auc"]),
        num(result["sensitivity"]),
        num(result["specificity"]),
        num(threshold),
        point["rule"],
    )
    return {**_compact(result), "operating_point": point, "domain": result["domain"]}, samples


def _add_comparisons(
    summary: dict[str, Any], samples: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]], models: Sequence[str]
) -> None:
    """A paired bootstrap test of the AUC difference for every pair of models, per data set."""
    for set_name, by_model in samples.items():
        target = summary["comparison"] if set_name == "test" else summary["external"][set_name]["comparison"]
        aucs = summary["models"] if set_name == "test" else summary["external"][set_name]["models"]
        for a, b in itertools.combinations(models, 2):
            test = paired_auc_test(by_model[a]["auc"], by_model[b]["auc"], aucs[a]["auc"], aucs[b]["auc"])
            target.append({"a": a, "b": b, **test})


def evaluate_models(
    models: Sequence[str],
    eval_params: EvaluateConfig,
    input_params: InputConfig,
    splits_csv: str | Path = HERE.splits,
    models_dir: str | Path = HERE.models,
    out_dir: str | Path = HERE.eval,
    metrics_path: str | Path = HERE.metrics,
    external_dir: str | Path = EXTERNAL_DIR,
    confirmation_log: str | Path = HERE.confirmation_log,
) -> dict[str, Any]:
    """Evaluate every model on the test split and on every external set.

    Args:
        models: model names (``models/<name>.keras``; ``ensemble`` is ``ensemble/ensemble.keras``).
        eval_params: the ``evaluate`` section (threshold rule, bootstrap, seed, external sets).
        input_params: the ``input`` section (the decoded-image cache folder).
        splits_csv: the split file (the test split is scored, the validation split sets thresholds).
        models_dir: where the models are.
        out_dir: where per-model predictions, metrics, curves and plots are written.
        metrics_path: where the summary is written.
        external_dir: where the external sets' indexes are.
        confirmation_log: when each confirmation set was first scored
            (:mod:`cxr.evaluation.set_roles`).

    Returns:
        The summary written to ``metrics.json``: per model the test figures at its shipped
        threshold, per external set the same figures, and paired AUC comparisons.

    Raises:
        CxrError: a model or its card is missing or cannot be loaded, or
            ``evaluate.threshold_source`` names no configured external set.
    """
    n_boot, seed = eval_params.bootstrap, eval_params.seed
    cache_dir = input_params.cache_dir
    splits_csv, out_dir = Path(splits_csv), Path(out_dir)
    sets_cfg = external_sets(eval_params)
    rule = threshold_rule(eval_params, list(sets_cfg))
    sets = [load_external(name, folder, external_dir) for name, folder in sets_cfg.items()]
    summary = _empty_summary(eval_params, sets, sets_cfg)
    samples: dict[str, dict[str, dict[str, np.ndarray]]] = {"test": {}, **{ext.name: {} for ext in sets}}
    decoded: dict[tuple[str, int, str, str], np.ndarray] = {}
    cards = {}
    for name in models:
        lm = load(model_file(name, models_dir))
        cards[name] = lm.card
        scored = _score_model(lm, splits_csv, cache_dir, sets, decoded, eval_params.allow_outside_intended_use)
        point = _shipped_point(rule, eval_params.threshold, scored, sets)
        _add_model_figures(summary, samples, name, lm, scored, point, sets, n_boot, seed, out_dir)
    _add_comparisons(summary, samples, models)
    _add_roles(summary, sets, eval_params, cards, models, Path(confirmation_log))
    _write_summary(summary, out_dir, Path(metrics_path))
    return summary


def _shipped_point(
    rule: tuple[str, str | None], fixed_threshold: float, scored: _Scored, sets: Sequence[ExternalSet]
) -> dict[str, Any]:
    """One model's shipped operating point under ``evaluate.threshold_source`` (:func:`operating_point`)."""
    return operating_point(
        rule,
        fixed_threshold,
        scored.val_point,
        {ext.name: (ext.labels, scored.external[ext.name]) for ext in sets},
    )


def _add_model_figures(
    summary: dict[str, Any],
    samples: dict[str, dict[str, dict[str, np.ndarray]]],
    name: str,
    lm: LoadedModel,
    scored: _Scored,
    point: Mapping[str, Any],
    sets: Sequence[ExternalSet],
    n_boot: int,
    seed: int,
    out_dir: Path,
) -> None:
    """One model's figures at its shipped threshold on the test split and on each external set, into
    ``summary``; its bootstrap samples, for the paired comparisons, into ``samples``."""
    summary["models"][name], samples["test"][name] = _score_test(name, lm, scored, point, n_boot, seed, out_dir)
    for ext in sets:
        compact, samples[ext.name][name] = _score_external(name, ext, scored, point, n_boot, seed, out_dir)
        summary["external"][ext.name]["models"][name] = compact


def _add_roles(
    summary: dict[str, Any],
    sets: Sequence[ExternalSet],
    eval_params: EvaluateConfig,
    cards: Mapping[str, ModelCard],
    models: Sequence[str],
    confirmation_log: Path,
) -> None:
    """What each external set's figures may claim, selection or confirmation (:func:`role_of`), into ``summary``."""
    settings = settings_digest(cards, eval_params)
    for ext in sets:
        summary["external"][ext.name].update(role_of(ext, eval_params, settings, models, confirmation_log))


def _write_summary(summary: Mapping[str, Any], out_dir: Path, metrics_path: Path) -> None:
    """The DVC plot data (ROC, PR, reliability, confusion) under ``out_dir``, and the summary to ``metrics_path``."""
    from cxr.evaluation.curves import write_plot_data

    write_plot_data(out_dir, summary)
    write_json(metrics_path, summary)


def _score_external(
    name: str, ext: ExternalSet, scored: _Scored, point: Mapping[str, Any], n_boot: int, seed: int, out_dir: Path
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One model on one external set at its shipped threshold; files under ``external-<set>/``."""
    threshold, probs = point["threshold"], scored.external[ext.name]
    result, samples = score(ext.labels, probs, ext.groups, threshold, n_boot, seed, scored.val_youden)
    own = youden_threshold(ext.labels, probs)
    result.update(
        calibration=_calibration(ext.labels, probs),
        threshold_chosen_on_this_set=point["chosen_on"] == ext.name,
        domain=domain_summary(scored.domain.get(ext.name)),
        at_own_youden={
            **at_threshold(ext.labels, probs, own),
            "note": "threshold chosen on this same set (optimistic)",
        },
    )
    _write_set(
        name, ext.name, ext.paths, ext.labels, probs, ext.groups, result, out_dir / name / f"external-{ext.name}"
    )
    compact = _compact(result)
    compact.update(
        domain=result["domain"],
        threshold_chosen_on_this_set=result["threshold_chosen_on_this_set"],
        at_own_youden={k: result["at_own_youden"][k] for k in ("threshold", "sensitivity", "specificity", "accuracy")},
    )
    chosen = " (threshold chosen on this set)" if compact["threshold_chosen_on_this_set"] else ""
    log.info(
        "%s on external %s: n=%d AUC %s (95%% CI %s), sensitivity %s, specificity %s at %s%s",
        name,
        ext.name,
        len(ext.labels),
        num(result["auc"], 4),
        ci_text(result["ci95"]["auc"]),
        num(result["sensitivity"]),
        num(result["specificity"]),
        num(threshold),
        chosen,
    )
    return compact, samples


def ci_text(pair: Sequence[float] | None) -> str:
    """A 95 % CI for logs and terminal lines: "0.946 to 0.988", "−0.038 to 0.010" ("n/a" when undefined).

    Args:
        pair: ``[low, high]``, or None.

    Returns:
        The interval with three decimals and real minus signs, or ``n/a``.
    """
    return interval_text(pair[0], pair[1]) if pair else "n/a"


def labelled_folder(data_dir: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Images, labels and patient ids of a folder in Kaggle layout (any split folders pooled).

    Args:
        data_dir: a folder with ``NORMAL/`` and ``PNEUMONIA/`` (optionally below split folders).

    Returns:
        The image files, their labels (0 normal, 1 pneumonia) and patient ids ("" when unknown).

    Raises:
        DataError: no class folders, or no images in them.
    """
    from imutils import paths as imutils_paths

    files, labels, groups = [], [], []
    for folder in find_class_folders(data_dir):
        for path in sorted(imutils_paths.list_images(str(folder.path))):
            files.append(Path(path))
            labels.append(CLASS_NAMES.index(folder.class_name))
            groups.append(parse_patient(Path(path).name)[0])
    if not files:
        raise DataError(f"{data_dir}: no images in its NORMAL/ and PNEUMONIA/ folders")
    return files, np.asarray(labels), groups


def evaluate_folder(
    model_path: str | Path,
    data_dir: str | Path,
    threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 42,
    threshold_source: str = "given",
) -> dict[str, Any]:
    """Score one saved model on a labelled folder (e.g. an outside test set); unreadable files skipped.

    Args:
        model_path: a saved ``.keras`` model with its card.
        data_dir: a labelled folder in ``{NORMAL,PNEUMONIA}/`` or Kaggle layout (split folders pooled).
        threshold: the decision threshold; None uses the model's shipped threshold (see
            :func:`cxr.common.thresholds.model_threshold`).
        n_boot: bootstrap resamples of patients for the 95 % intervals.
        seed: the bootstrap seed.
        threshold_source: how to name a given ``threshold`` in the result.

    Returns:
        The metrics of :func:`score`, plus the model, the folder, whether the model file matches its
        card, the skipped files with their reasons, and where the threshold came from.

    Raises:
        CxrError: the model or its card is missing or cannot be loaded.
        DataError: the folder has no class folders, no images, or none that could be read.
    """
    lm = load(model_path)
    threshold, source = lm.threshold(threshold, threshold_source)
    files, labels, groups = labelled_folder(data_dir)
    keep, images, skipped = [], [], []
    for i, (path, image, error) in enumerate(iter_images(files, lm.input)):
        if error or image is None:  # iter_images yields an image or an error, never both
            skipped.append({"path": str(path), "reason": error})
            continue
        keep.append(i)
        images.append(image)
    if not images:
        raise DataError(f"{data_dir}: none of its {len(files)} images could be read")
    probs = predict_images(lm.model, np.stack(images))
    result, _ = score(
        labels[keep],
        probs,
        [groups[i] for i in keep],
        threshold,
        n_boot,
        seed,
        youden=validation_youden(lm.card, lm.name, lm.sha256),
    )
    result.update(
        model=str(model_path), data=str(data_dir), verified=lm.verified, skipped=skipped, threshold_source=source
    )
    return result
