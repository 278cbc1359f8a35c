"""What an external set's figures may claim: a selection set's or a confirmation set's.

A **selection** set was used to choose among configurations (``evaluate.compared`` of them): its
figures carry the winner's curse and are labelled so. A **confirmation** set is only scored. Its
figures are confirmatory only for the settings it was first scored with: the first scoring of a
set (by the sha256 of its images) is recorded in ``lineage/confirmation.jsonl`` with a digest of
the settings that made the models and their thresholds, and a later scoring under other settings
is flagged in ``metrics.json`` and the report (the set has then been looked at while settings
changed, and may have steered them).

The settings digest covers, per model scored: the training configuration and preprocessing its
card records, the split it was trained on, and the threshold rule (``evaluate.threshold_source``,
``evaluate.threshold``). Retraining with the same settings keeps the digest; changing a learning
rate, an augmentation, the data or the threshold rule changes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cxr.common.model_card import ModelCard
from cxr.config import EvaluateConfig
from cxr.data.external_sets import ExternalSet
from cxr.provenance import lineage_log
from cxr.workspace import HERE


def settings_digest(cards: Mapping[str, ModelCard], eval_params: EvaluateConfig) -> str:
    """sha256 of what made the scored models and their thresholds (see the module docstring).

    Args:
        cards: ``{model name: its card}`` of every model scored.
        eval_params: the ``evaluate`` section (the threshold rule).

    Returns:
        The hex digest.
    """
    what = {
        "models": {
            name: {
                "train_config": card.extra("train_config"),
                "preprocessing": card.input.preprocessing if card.input else None,
                "members": [m.model for m in card.members or []],
                "splits_sha256": card.splits_sha256,
            }
            for name, card in sorted(cards.items())
        },
        "threshold_source": eval_params.threshold_source,
        "threshold": eval_params.threshold,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def set_digest(ext: ExternalSet) -> str:
    """sha256 over the sorted sha256s of a set's images: the set's identity, whatever its folder."""
    return hashlib.sha256("\n".join(sorted(ext.sha256)).encode()).hexdigest()


def _first_scoring(log_path: Path, name: str, digest: str) -> dict[str, Any] | None:
    if not log_path.is_file():
        return None
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("set_sha256") == digest and record.get("set") == name:
            return record
    return None


def role_of(
    ext: ExternalSet,
    eval_params: EvaluateConfig,
    settings: str,
    models: Sequence[str],
    log_path: Path = HERE.confirmation_log,
) -> dict[str, Any]:
    """The role record ``metrics.json`` keeps for one external set (and, for a confirmation set
    scored for the first time, the line appended to the confirmation log).

    Args:
        ext: the indexed set.
        eval_params: ``evaluate`` (its ``roles`` and ``compared``).
        settings: :func:`settings_digest` of this evaluation.
        models: the models scored.
        log_path: the confirmation log.

    Returns:
        ``{role, ...}``: a selection set's ``configurations_compared``; a confirmation set's
        ``set_sha256``, ``settings_sha256``, ``first_scored`` and ``changed_after_first_scored``.
    """
    role = eval_params.roles.get(ext.name, "selection")
    if role == "selection":
        return {"role": "selection", "configurations_compared": eval_params.compared.get(ext.name)}
    digest = set_digest(ext)
    first = _first_scoring(log_path, ext.name, digest)
    if first is None:
        first = {
            "set": ext.name,
            "set_sha256": digest,
            "settings_sha256": settings,
            "models": list(models),
            "first_scored": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        log_path.parent.mkdir(parents=True, exist_ok=True)
        lineage_log.append(first, log_path)
    return {
        "role": "confirmation",
        "set_sha256": digest,
        "settings_sha256": settings,
        "first_scored": {k: first.get(k) for k in ("first_scored", "settings_sha256", "models")},
        "changed_after_first_scored": first.get("settings_sha256") != settings,
    }
