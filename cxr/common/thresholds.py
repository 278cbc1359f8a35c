"""Every decision about a model's threshold on P(pneumonia), in one module.

Two questions, two entry points:

- **Which threshold should this model ship with?** Training answers it on the validation split
  (:func:`validation_operating_point`: Youden's J, or the highest threshold keeping a validation
  sensitivity) and writes it into the model card. The evaluate step may override it by
  ``evaluate.threshold_source`` (:func:`threshold_rule`, :func:`operating_point`) and records the
  result for exactly that model file's bytes (:func:`record_operating_point`).
- **Which threshold does this model file use, and why?** :func:`model_threshold`: the caller's
  explicit threshold (``--threshold``, or ``evaluate.threshold`` under the ``fixed`` rule), then
  the operating point ``evaluate`` recorded for these bytes, then the card's, then 0.5.
  ``cxr predict``, ``cxr serve``, ``cxr evaluate --data``, Grad-CAM's outcome selection and the
  report's reader agreement all ask it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cxr.common.metrics import sensitivity_threshold, youden_threshold
from cxr.common.model_card import ModelCard, OperatingPoint
from cxr.config import EvaluateConfig
from cxr.errors import CxrError, DataError
from cxr.files import load_json_bounded, write_json
from cxr.safe_text import printable
from cxr.workspace import HERE

YOUDEN_RULE = "Youden's J on the validation split"
RECORD_NAME = "operating_point.json"


# ------------------------------------------------------------------ choosing: at training time
def validation_operating_point(
    labels: np.ndarray, probabilities: np.ndarray, target_sensitivity: float | None = None
) -> dict[str, Any] | None:
    """The threshold a model ships with, chosen on its validation split (None when undefined).

    Args:
        labels, probabilities: the validation split's truth and the model's P(pneumonia).
        target_sensitivity: None for Youden's J; a fraction for the highest threshold that keeps
            that validation sensitivity.

    Returns:
        ``{threshold, rule, chosen_on: "val"}``, ``rule`` naming how it was chosen; None when the
        validation split lacks one of the classes or a probability is not finite.
    """
    labels = np.asarray(labels).astype(int)
    if len(set(labels.tolist())) < 2 or not np.isfinite(probabilities).all():
        return None
    if target_sensitivity is None:
        return {"threshold": youden_threshold(labels, probabilities), "rule": YOUDEN_RULE, "chosen_on": "val"}
    return {
        "threshold": sensitivity_threshold(labels, probabilities, target_sensitivity),
        "rule": f"highest threshold with validation sensitivity ≥ {target_sensitivity:g}",
        "chosen_on": "val",
    }


# ------------------------------------------------------------------ choosing: at evaluation time
THRESHOLD_RULES = ("validation", "fixed", "external:<name>")


def threshold_rule(eval_params: EvaluateConfig, external_names: Sequence[str]) -> tuple[str, str | None]:
    """``evaluate.threshold_source`` checked: ``("validation", None)``, ``("fixed", None)`` or
    ``("external", name)``.

    Args:
        eval_params: the ``evaluate`` section.
        external_names: the configured external sets.

    Returns:
        The rule's kind and, for ``external:<name>``, the set's name.

    Raises:
        CxrError: an unknown rule, or ``external:<name>`` naming no configured set.
    """
    source = eval_params.threshold_source
    if source in ("validation", "fixed"):
        return source, None
    kind, _, name = source.partition(":")
    if kind == "external" and name in external_names:
        return "external", name
    if kind == "external":
        raise CxrError(
            f"evaluate.threshold_source={source}: no external set named {name!r} in evaluate.external "
            f"(configured: {', '.join(external_names) or 'none'})"
        )
    raise CxrError(f"evaluate.threshold_source={source!r}: choose one of {', '.join(THRESHOLD_RULES)}")


def validation_point(card: ModelCard, labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """The validation rule's threshold: the card's operating point (chosen at training time by
    ``train.<model>.target_sensitivity``), or Youden's J on validation for a card without one.

    Args:
        card: the model's card.
        labels: (N,) validation truth, for the Youden fallback.
        probs: (N,) the model's validation P(pneumonia).

    Returns:
        ``{threshold, rule, chosen_on: "val"}``.
    """
    point = card.operating_point
    if point is not None and point.chosen_on == "val":
        return point.model_dump()
    return {"threshold": youden_threshold(labels, probs), "rule": YOUDEN_RULE, "chosen_on": "val"}


def operating_point(
    rule: tuple[str, str | None],
    fixed_threshold: float,
    val_point: Mapping[str, Any],
    external_probs: Mapping[str, tuple[np.ndarray, np.ndarray]],
) -> dict[str, Any]:
    """The shipped threshold of one model under ``evaluate.threshold_source``.

    Args:
        rule: the checked rule (:func:`threshold_rule`).
        fixed_threshold: ``evaluate.threshold``, for the ``fixed`` rule.
        val_point: the model's validation operating point (:func:`validation_point`).
        external_probs: ``{set name: (labels, the model's probabilities)}``, for ``external:<name>``.

    Returns:
        ``{threshold, rule, chosen_on}``: ``chosen_on`` is ``"val"``, the external set's name, or
        None for a fixed threshold.
    """
    kind, name = rule
    if kind == "fixed":
        return {"threshold": float(fixed_threshold), "rule": "fixed (evaluate.threshold)", "chosen_on": None}
    if kind == "external":
        labels, probs = external_probs[str(name)]
        return {
            "threshold": youden_threshold(labels, probs),
            "rule": f"Youden's J on external set {name}",
            "chosen_on": name,
        }
    return dict(val_point)


# ------------------------------------------------------------------ the evaluate step's record
def record_path(name: str, eval_dir: str | Path = HERE.eval) -> Path:
    """``<eval_dir>/<name>/operating_point.json``: where ``evaluate`` records a model's shipped threshold."""
    return Path(eval_dir) / name / RECORD_NAME


def record_operating_point(
    name: str, model_sha256: str | None, point: Mapping[str, Any], eval_dir: str | Path = HERE.eval
) -> Path:
    """Record the operating point ``evaluate`` chose for exactly these model bytes.

    Args:
        name: the model's name.
        model_sha256: the model file's sha256 (the record is used only for those bytes).
        point: ``{threshold, rule, chosen_on}``.
        eval_dir: the evaluation reports folder.

    Returns:
        The record's path.
    """
    path = record_path(name, eval_dir)
    write_json(
        path, {**OperatingPoint.model_validate(dict(point)).model_dump(), "model": name, "model_sha256": model_sha256}
    )
    return path


def _valid_point(raw: object) -> OperatingPoint | None:
    if not isinstance(raw, dict):
        return None
    value = raw.get("threshold")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    try:
        return OperatingPoint.model_validate({k: raw.get(k) for k in ("threshold", "rule", "chosen_on")})
    except ValueError:
        return None


def recorded_point(name: str, eval_dir: str | Path = HERE.eval, model_sha256: str | None = None) -> OperatingPoint:
    """The operating point ``evaluate`` recorded for a model.

    Args:
        name: the model's name.
        eval_dir: the evaluation reports folder.
        model_sha256: when given, the record must be for these bytes.

    Returns:
        The recorded point.

    Raises:
        DataError: no record, an unreadable one, one without a threshold in [0, 1], or one for other bytes.
    """
    path = record_path(name, eval_dir)
    if not path.exists():
        raise DataError(f"{path}: not found; run the evaluate step first (dvc repro evaluate)")
    try:
        raw = load_json_bounded(path, "operating-point record")
    except CxrError as exc:
        raise DataError(f"{printable(exc)}; rerun the evaluate step") from None
    point = _valid_point(raw)
    if point is None:
        raise DataError(f"{path}: no threshold in [0, 1]; rerun the evaluate step")
    if model_sha256 is not None and raw.get("model_sha256") != model_sha256:
        raise DataError(f"{path}: recorded for other model bytes; rerun the evaluate step")
    return point


# ------------------------------------------------------------------ using: which threshold, and why
class Threshold(NamedTuple):
    """A model's decision threshold and a phrase naming where it came from (for output and logs)."""

    value: float
    source: str


def model_threshold(
    name: str,
    model_sha256: str,
    card: ModelCard,
    given: float | None = None,
    given_source: str = "--threshold",
    eval_dir: str | Path = HERE.eval,
) -> Threshold:
    """The threshold a model file uses, and why.

    In order: ``given`` (the caller's ``--threshold``, or ``evaluate.threshold`` under the fixed
    rule); the operating point ``evaluate`` recorded for exactly these bytes (it follows
    ``evaluate.threshold_source``); the card's operating point (chosen on the validation split at
    training time); else 0.5. A damaged record, or one for other bytes, is skipped.

    Args:
        name: the model's name (``models/<name>.keras``; ``ensemble``).
        model_sha256: the sha256 of the file being used (not the card's claim).
        card: the model's card.
        given: an explicit threshold, or None.
        given_source: how to name ``given`` in the source phrase.
        eval_dir: where ``evaluate`` recorded operating points.

    Returns:
        The :class:`Threshold`.
    """
    if given is not None:
        return Threshold(float(given), given_source)
    try:
        point = recorded_point(name, eval_dir, model_sha256 or "")
        return Threshold(point.threshold, f"{printable(point.rule)} ({record_path(name, eval_dir).as_posix()})")
    except DataError:
        pass
    if card.operating_point is not None:
        return Threshold(card.operating_point.threshold, f"{printable(card.operating_point.rule)} (model card)")
    return Threshold(0.5, "default 0.5 (no operating point in the card)")


def validation_youden(
    card: ModelCard, name: str, model_sha256: str | None, eval_dir: str | Path = HERE.eval
) -> float | None:
    """The Youden threshold chosen on the validation split for exactly this model file, if known.

    The card's operating point counts only when its rule is Youden's J (with
    ``train.common.target_sensitivity`` it is a sensitivity-target threshold, not Youden's);
    otherwise the one ``evaluate`` recorded in ``<name>/metrics.json`` for these bytes, else None.
    """
    point = card.operating_point
    if point is not None and point.chosen_on == "val" and point.rule.startswith("Youden"):
        return point.threshold
    record = Path(eval_dir) / name / "metrics.json"
    try:
        data = load_json_bounded(record, "evaluation record")
    except CxrError:
        return None
    if not isinstance(data, dict) or data.get("model_sha256") != model_sha256:
        return None
    value = data.get("youden_threshold")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
