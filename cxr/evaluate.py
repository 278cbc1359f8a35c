"""The ``evaluate`` step: test-split metrics a clinical reader expects, with patient-level CIs.

Per model: the notebook's classification report, confusion matrix and ROC/AUC at
``evaluate.threshold`` (0.5), plus sensitivity, specificity, PPV, NPV, F1, balanced accuracy,
precision–recall, Brier score and a reliability curve; 95 % bootstrap intervals that resample
*patients* (seeded); and an operating threshold chosen on the validation split by Youden's J,
reported beside — never chosen on the test split. Across models: a paired bootstrap test of the
AUC difference. ``cxr evaluate --model M --data DIR`` scores one model on any labelled folder.
"""

from __future__ import annotations

import csv
import itertools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import classification_report, precision_recall_curve, roc_curve

from cxr import CLASS_NAMES, plots
from cxr.dataset import load_images, read_split
from cxr.errors import DataError
from cxr.files import write_json
from cxr.inference import LoadedModel, iter_images, load, predict_images
from cxr.layout import find_class_folders
from cxr.manifest import parse_patient
from cxr.metrics import (
    at_threshold,
    bootstrap,
    calibration_bins,
    interval,
    paired_auc_test,
    threshold_free,
    youden_threshold,
)

log = logging.getLogger(__name__)


def score(labels: np.ndarray, probabilities: np.ndarray, groups: Sequence[str], threshold: float,
          n_boot: int, seed: int, youden: float | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """All metrics of one model on one labelled set; also the bootstrap samples (for comparisons)."""
    labels = np.asarray(labels).astype(int)
    result: dict[str, Any] = {**threshold_free(labels, probabilities),
                              "at_threshold": at_threshold(labels, probabilities, threshold)}
    samples = bootstrap(labels, [probabilities], groups, threshold, n_boot, seed)[0]
    result["ci95"] = {k: interval(v) for k, v in samples.items()}
    result["ci_method"] = f"{n_boot} bootstrap resamples of patients (seed {seed})"
    if youden is not None:
        result["youden_threshold"] = youden
        result["at_youden"] = at_threshold(labels, probabilities, youden)
    for key in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "balanced_accuracy"):
        result[key] = result["at_threshold"][key]
    result["classification_report"] = classification_report(
        labels, (probabilities >= threshold).astype(int), labels=[0, 1], target_names=["normal", "pn"],
        output_dict=True, zero_division=0)
    return result, samples


def _write_rows(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _curves(name: str, labels: np.ndarray, probs: np.ndarray, result: Mapping[str, Any], out: Path) -> None:
    fpr, tpr, thr = roc_curve(labels, probs)
    _write_rows(out / "roc.csv", ["fpr", "tpr", "threshold"],
                [(round(a, 5), round(b, 5), round(min(c, 1.0), 5)) for a, b, c in zip(fpr, tpr, thr, strict=True)])
    precision, recall, _ = precision_recall_curve(labels, probs)
    _write_rows(out / "pr.csv", ["recall", "precision"],
                [(round(r, 5), round(p, 5)) for r, p in zip(recall, precision, strict=True)])
    bins = calibration_bins(labels, probs)
    _write_rows(out / "calibration.csv", ["mean_predicted", "fraction_positive", "count"],
                [(round(b["mean_predicted"], 5), round(b["fraction_positive"], 5), b["count"]) for b in bins])
    auc = result["auc"] or float("nan")
    plots.curve(fpr, tpr, out / "roc.png", f"{name}: ROC", "1 − specificity", "sensitivity", diagonal=True,
                label=f"AUC {auc:.3f}")
    plots.curve(recall, precision, out / "pr.png", f"{name}: precision–recall", "recall (sensitivity)",
                "precision (PPV)", label=f"AP {result['average_precision'] or float('nan'):.3f}")
    plots.curve([b["mean_predicted"] for b in bins], [b["fraction_positive"] for b in bins],
                out / "calibration.png", f"{name}: reliability (Brier {result['brier']:.3f})",
                "mean predicted P(pneumonia)", "observed fraction with pneumonia", diagonal=True)
    plots.confusion(result["at_threshold"]["confusion"], out / "confusion.png",
                    f"{name} @ {result['at_threshold']['threshold']:.2f}")


def _split_probabilities(lm: LoadedModel, splits_csv: Path, split: str, cache_dir: str
                         ) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    import pandas as pd

    cfg = lm.cached_input(cache_dir)
    paths, labels, key = read_split(splits_csv, split)
    images = load_images(paths, key, cfg, split)
    frame = pd.read_csv(splits_csv, keep_default_na=False, dtype={"patient_id": str})
    groups = frame.loc[frame["split"] == split, "patient_id"].tolist()
    return paths, labels, predict_images(lm.model, images), groups


def evaluate_models(models: Sequence[str], eval_params: Mapping[str, Any], input_params: Mapping[str, Any],
                    splits_csv: str | Path = "data/prepared/splits.csv", models_dir: str | Path = "models",
                    out_dir: str | Path = "reports/eval", metrics_path: str | Path = "reports/metrics.json",
                    ) -> dict[str, Any]:
    """Evaluate every model on the test split; write per-model files and ``reports/metrics.json``."""
    threshold = float(eval_params.get("threshold", 0.5))
    n_boot, seed = int(eval_params.get("bootstrap", 1000)), int(eval_params.get("seed", 42))
    cache_dir = str(input_params.get("cache_dir", "data/cache"))
    splits_csv, out_dir = Path(splits_csv), Path(out_dir)
    summary: dict[str, Any] = {"threshold": threshold, "split": "test", "models": {}, "comparison": []}
    samples: dict[str, dict[str, np.ndarray]] = {}
    for name in models:
        lm = load(Path(models_dir) / f"{name}.keras")
        _, val_labels, val_probs, _ = _split_probabilities(lm, splits_csv, "val", cache_dir)
        paths, labels, probs, groups = _split_probabilities(lm, splits_csv, "test", cache_dir)
        youden = youden_threshold(val_labels, val_probs)
        result, samples[name] = score(labels, probs, groups, threshold, n_boot, seed, youden)
        result["model_sha256"] = lm.card.get("model_sha256")
        result["verified"] = lm.verified
        result["health"] = lm.card.get("health", {}).get("status")
        target = out_dir / name
        rows = [(p, int(y), g, round(float(q), 6)) for p, y, g, q in zip(paths, labels, groups, probs, strict=True)]
        _write_rows(target / "predictions.csv", ["path", "label", "patient_id", "probability"], rows)
        _curves(name, labels.astype(int), probs, result, target)
        write_json(target / "metrics.json", result)
        summary["models"][name] = {k: result[k] for k in (
            "auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "balanced_accuracy", "brier",
            "average_precision", "ci95", "youden_threshold", "n")}
        summary["models"][name]["at_youden"] = {k: result["at_youden"][k] for k in
                                                ("sensitivity", "specificity", "accuracy")}
        log.info("%s: test AUC %.4f (95%% CI %s), sensitivity %.3f, specificity %.3f at %.2f", name,
                 result["auc"], result["ci95"]["auc"], result["sensitivity"], result["specificity"], threshold)
    for a, b in itertools.combinations(models, 2):
        test = paired_auc_test(samples[a]["auc"], samples[b]["auc"], summary["models"][a]["auc"],
                               summary["models"][b]["auc"])
        summary["comparison"].append({"a": a, "b": b, **test})
    write_json(Path(metrics_path), summary)
    return summary


def labelled_folder(data_dir: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Images, labels and patient ids of a folder in Kaggle layout (any split folders pooled)."""
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


def _validation_youden(lm: LoadedModel, eval_dir: Path = Path("reports/eval")) -> float | None:
    """The Youden threshold the pipeline chose on the validation split for exactly this model file."""
    name = lm.path.name.removesuffix(".keras")
    record = eval_dir / name / "metrics.json"
    if not record.is_file():
        return None
    import json

    data = json.loads(record.read_text())
    return data.get("youden_threshold") if data.get("model_sha256") == lm.card.get("model_sha256") else None


def evaluate_folder(model_path: str | Path, data_dir: str | Path, threshold: float = 0.5, n_boot: int = 1000,
                    seed: int = 42) -> dict[str, Any]:
    """Score one saved model on a labelled folder (e.g. an outside test set); unreadable files skipped."""
    lm = load(model_path)
    files, labels, groups = labelled_folder(data_dir)
    keep, images, skipped = [], [], []
    for i, (path, image, error) in enumerate(iter_images(files, lm.input)):
        if error:
            skipped.append({"path": str(path), "reason": error})
            continue
        keep.append(i)
        images.append(image)
    if not images:
        raise DataError(f"{data_dir}: none of its {len(files)} images could be read")
    probs = predict_images(lm.model, np.stack(images))
    result, _ = score(labels[keep], probs, [groups[i] for i in keep], threshold, n_boot, seed,
                      youden=_validation_youden(lm))
    result.update(model=str(model_path), data=str(data_dir), verified=lm.verified, skipped=skipped)
    return result
