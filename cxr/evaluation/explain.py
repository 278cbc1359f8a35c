"""The ``explain`` step: Grad-CAM galleries and a number for where each model looks.

For every model, a seeded selection of test images covering true/false positives and negatives
(``evaluate.gradcam_per_outcome`` of each) is overlaid with the last convolution's Grad-CAM
(interpolant 0.5), titled with prediction, P(pneumonia) and truth. Over *all* test images, the
share of heat in the image border (``evaluate.border_margin``) is reported against the share a
uniform map would have: a ratio above 1 means attention to burned-in markers ("A-P", "R") and
edges rather than the lung field.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr import CLASS_NAMES
from cxr.config import EvaluateConfig, InputConfig
from cxr.files import write_json
from cxr.inference.gradcam import border_fraction, gradcam, last_conv_layer, overlay
from cxr.inference.loading import ENSEMBLE, LoadedModel, load, model_file
from cxr.training.input_pipeline import load_images, read_split
from cxr.workspace import HERE

log = logging.getLogger(__name__)

OUTCOMES = ("TP", "FP", "TN", "FN")


def outcome(label: int, probability: float, threshold: float) -> str:
    """The confusion-matrix cell of one prediction.

    Args:
        label: the truth, 0 normal or 1 pneumonia.
        probability: P(pneumonia).
        threshold: the probability at or above which the prediction is PNEUMONIA.

    Returns:
        ``TP``, ``FP``, ``TN`` or ``FN``.
    """
    positive = probability >= threshold
    return ("T" if positive == bool(label) else "F") + ("P" if positive else "N")


def select(predictions: pd.DataFrame, threshold: float, per_outcome: int, seed: int) -> pd.DataFrame:
    """A seeded sample of up to ``per_outcome`` rows of each outcome, in TP, FP, TN, FN order.

    Args:
        predictions: ``predictions.csv`` of ``evaluate``: ``path``, ``label``, ``probability``.
        threshold: the decision threshold that defines the outcomes.
        per_outcome: the most rows taken per outcome (fewer when fewer exist).
        seed: the sampling seed.

    Returns:
        The chosen rows with an ``outcome`` column; within an outcome, rows keep their file order.
    """
    frame = predictions.assign(
        outcome=[
            outcome(y, p, threshold) for y, p in zip(predictions["label"], predictions["probability"], strict=True)
        ]
    )
    rng = np.random.default_rng(seed)
    parts = []
    for kind in OUTCOMES:
        rows = frame[frame["outcome"] == kind]
        take: np.ndarray | list[int] = (
            rng.choice(len(rows), size=min(per_outcome, len(rows)), replace=False) if len(rows) else []
        )
        parts.append(rows.iloc[sorted(take)])
    return pd.concat(parts)


def _gallery(images: np.ndarray, cams: np.ndarray, rows: pd.DataFrame, out: Path, title: str) -> Path:
    from cxr.common.plots import plt

    n = len(rows)
    columns = min(4, max(n, 1))
    lines = (n + columns - 1) // columns
    fig, axes = plt.subplots(lines, columns, figsize=(3.0 * columns, 3.3 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, cam, (_, row) in zip(axes.flat, images, cams, rows.iterrows(), strict=False):
        ax.imshow(overlay(image.astype(np.float32) / 255.0, cam))
        predicted = CLASS_NAMES[int(row["probability"] >= row["threshold"])]
        ax.set_title(
            f"{row['outcome']}: pred {predicted}\nP(pneumonia) {row['probability']:.3f} · "
            f"true {CLASS_NAMES[int(row['label'])]}",
            fontsize=7.5,
        )
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, metadata={"Software": None})
    plt.close(fig)
    return out


def explain_models(
    models: Sequence[str],
    eval_params: EvaluateConfig,
    input_params: InputConfig,
    splits_csv: str | Path = HERE.splits,
    models_dir: str | Path = HERE.models,
    eval_dir: str | Path = HERE.eval,
    out_dir: str | Path = HERE.gradcam,
) -> dict[str, Any]:
    """Grad-CAM gallery and border-heat figure of every model on the test split.

    Needs ``evaluate`` to have run: the gallery's images are chosen from its test predictions, at
    the model's shipped threshold (:func:`cxr.common.thresholds.model_threshold`), among the
    images inside the model's domain (its content check; the count skipped is in the summary). The ensemble
    is skipped with one log line: it averages several networks, so it has no single last
    convolution to take a Grad-CAM of (its members' galleries show where each one looks).

    Args:
        models: model names (``<models_dir>/<name>.keras``).
        eval_params: the ``evaluate`` section: ``gradcam_per_outcome``, ``seed``, ``border_margin``,
            ``gradcam_layer`` (empty: the last convolution).
        input_params: the ``input`` section (the decoded-image cache folder).
        splits_csv: the split file whose test split is explained.
        models_dir: where the models are.
        eval_dir: where ``evaluate`` wrote ``<name>/predictions.csv`` and operating points.
        out_dir: where ``<name>.png`` galleries and ``summary.json`` are written.

    Returns:
        The summary written to ``summary.json``: the border margin, the uniform map's border share,
        and per model the layer, gallery file, threshold, mean border share over every test image,
        its ratio to uniform, the image count and the examples shown.

    Raises:
        CxrError: a model or its card is missing or cannot be loaded, or ``evaluate.gradcam_layer``
            is not a layer on the model's main path.
    """
    out_dir = Path(out_dir)
    margin = eval_params.border_margin
    uniform = 1 - (1 - 2 * margin) ** 2  # the border's share of a uniform map
    summary: dict[str, Any] = {"border_margin": margin, "uniform_border_fraction": uniform, "models": {}}
    for name in models:
        if name == ENSEMBLE:
            log.info(
                "%s: no Grad-CAM (it averages several networks, with no single last convolution); "
                "explain its members instead",
                name,
            )
            continue
        lm = load(model_file(name, models_dir))
        threshold, _ = lm.threshold(eval_dir=eval_dir)  # TP/FP/TN/FN as the model ships
        cfg = lm.cached_input(input_params.cache_dir)
        summary["models"][name] = _explain_model(
            name, lm, threshold, cfg, eval_params, splits_csv, eval_dir, out_dir, uniform
        )
    write_json(out_dir / "summary.json", summary)
    return summary


def _explain_model(
    name: str,
    lm: LoadedModel,
    threshold: float,
    cfg: InputConfig,
    eval_params: EvaluateConfig,
    splits_csv: str | Path,
    eval_dir: str | Path,
    out_dir: Path,
    uniform: float,
) -> dict[str, Any]:
    """One model's Grad-CAM gallery (``<out_dir>/<name>.png``) and border heat over every test image.

    Args: as :func:`explain_models`'s; ``threshold`` is the model's shipped one, ``cfg`` its input
    settings with the decoded-image cache, ``uniform`` the border share of a uniform map.

    Returns:
        The model's entry in ``summary.json``.
    """
    layer = eval_params.gradcam_layer or None
    paths, _, key = read_split(splits_csv, "test")
    images = load_images(paths, key, cfg, "test")
    fractions = _border_fractions(lm.model, images, eval_params.border_margin, layer)
    predictions = pd.read_csv(Path(eval_dir) / name / "predictions.csv", keep_default_na=False)
    _, scores = lm.score(images)  # the gallery shows films in the model's domain only
    outside = set() if scores is None else {p for p, s in zip(paths, scores, strict=True) if s > 1.0}
    shown = predictions[~predictions["path"].isin(outside)]
    chosen = select(shown, threshold, eval_params.gradcam_per_outcome, eval_params.seed).assign(threshold=threshold)
    index = {p: i for i, p in enumerate(paths)}
    picked = images[[index[p] for p in chosen["path"]]]
    cams, _ = gradcam(lm.model, picked.astype(np.float32) / 255.0, layer)
    gallery = _gallery(
        picked, cams, chosen, out_dir / f"{name}.png", f"{name}: Grad-CAM of {layer or last_conv_layer(lm.model)}"
    )
    value = float(np.nanmean(fractions))
    log.info("%s: Grad-CAM border heat %.3f (uniform %.3f)", name, value, uniform)
    return {
        "layer": layer or last_conv_layer(lm.model),
        "gallery": gallery.as_posix(),
        "threshold": threshold,
        "border_fraction_mean": round(value, 4),
        "border_to_uniform_ratio": round(value / uniform, 3),
        "images": len(fractions),
        "out_of_domain_skipped": None if scores is None else len(outside),
        "examples": _examples(chosen),
    }


def _border_fractions(model: Any, images: np.ndarray, margin: float, layer: str | None) -> list[float]:
    """The share of Grad-CAM heat within ``margin`` of the border, per image (32 images per pass)."""
    fractions = []
    for start in range(0, len(images), 32):
        cams, _ = gradcam(model, images[start : start + 32].astype(np.float32) / 255.0, layer)
        fractions += [border_fraction(c, margin) for c in cams]
    return fractions


def _examples(chosen: pd.DataFrame) -> list[dict[str, Any]]:
    """The gallery's images as listed in ``summary.json``: path, outcome, P(pneumonia), truth."""
    return [
        {
            "path": r["path"],
            "outcome": r["outcome"],
            "probability": float(r["probability"]),
            "label": CLASS_NAMES[int(r["label"])],
        }
        for _, r in chosen.iterrows()
    ]
