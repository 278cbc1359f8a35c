"""Prefect tasks for the input preview, for training one model and for its promotion.

Training runs ``cxr train --model NAME`` in a child process (:mod:`tasks.runner`): each model gets
its own TensorFlow runtime, several models can train concurrently, and the code path is exactly
the one ``dvc repro`` runs.
"""

from __future__ import annotations

import json
import re
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from cxr.common.model_card import read_card
from cxr.evaluation.promotion import DECISION_FILE
from cxr.evaluation.promotion import markdown as promotion_markdown
from cxr.provenance import model_store
from cxr.provenance.hashing import hash_tree, sha256_file
from cxr.workspace import HERE
from tasks.caching import stage_policy
from tasks.runner import run_cxr


@task(name="preview", cache_policy=stage_policy("preview", path_inputs=("inputs",)), persist_result=True)
def preview_task(inputs: list[str], params_path: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Plot one augmented training batch (and warm the decoded-image cache).

    Args:
        inputs: the stage's inputs (the splits file first).
        params_path: the parameters file.
        settings: the stage's settings (``input``, ``train.common.seed``).

    Returns:
        The plot's path.
    """
    out = HERE.preview_plot.as_posix()
    run_cxr(["preview", "--splits", inputs[0], "--out", out], params_path, settings)
    return {"plot": out}


@task(
    name="train",
    cache_policy=stage_policy("train", path_inputs=("inputs",)),
    persist_result=True,
    task_run_name="train-{model}",
)
def train_task(model: str, inputs: list[str], params_path: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Train one model into a new stored version (the challenger); keyed on the content of its inputs
    and exactly the settings it reads. :func:`promote_task` decides whether it ships.

    Args:
        model: the model name.
        inputs: the stage's inputs (splits and manifest).
        params_path: the parameters file.
        settings: ``input``, ``train.common`` and ``train.<model>``.

    Returns:
        The version's folder with its tree hash, its id, model sha256, validation AUC and health status.
    """
    run_cxr(["train", "--model", model, "--splits", inputs[0], "--no-promote"], params_path, settings)
    version = model_store.latest(model)
    if version is None:
        raise RuntimeError(f"{model}: training finished but stored no version")
    card = version.card()
    return {
        "version": version.folder.as_posix(),
        "version_sha256": hash_tree(version.folder),
        "id": version.id,
        "model_sha256": card.model_sha256,
        "val_auc": card.validation.get("auc"),
        "health": card.health.status if card.health else None,
    }


@task(
    name="promote",
    cache_policy=stage_policy("promote", path_inputs=("inputs",)),
    persist_result=True,
    task_run_name="promote-{model}",
)
def promote_task(model: str, inputs: list[str], params_path: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Champion/challenger for one model (``cxr promote``); the decision becomes a markdown artifact.

    Args:
        model: the model name.
        inputs: the stage's inputs (its version store, the splits, the external indexes).
        params_path: the parameters file.
        settings: ``promotion``, ``monitoring``, ``evaluate.external``.

    Returns:
        The shipped model and card with their hashes, and the decision's outcome and line.
    """
    run_cxr(["promote", "--model", model, "--splits", inputs[1]], params_path, settings)
    decision = json.loads((HERE.train_reports(model) / DECISION_FILE).read_text(encoding="utf-8"))
    create_markdown_artifact(
        markdown=promotion_markdown(decision),
        key=f"promotion-{artifact_key(model)}",
        description=decision["line"],
    )
    card_path = HERE.card(model)
    card = read_card(card_path)
    return {
        "model": HERE.model(model).as_posix(),
        "model_sha256": card.model_sha256,
        "card": card_path.as_posix(),
        "card_sha256": sha256_file(card_path),
        "promoted": decision["promoted"],
        "outcome": decision["outcome"],
        "line": decision["line"],
        "val_auc": card.validation.get("auc"),
        "health": card.health.status if card.health else None,
    }


def artifact_key(name: str) -> str:
    """A Prefect artifact key from a model name (lowercase letters, digits and dashes only)."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "model"
