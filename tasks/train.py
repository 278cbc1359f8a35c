"""Prefect tasks for the input preview and for training one model.

Training runs ``cxr train --model NAME`` in a child process (:mod:`tasks.runner`): each model gets
its own TensorFlow runtime, several models can train concurrently, and the code path is exactly
the one ``dvc repro`` runs.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from cxr.common.model_card import read_card
from cxr.provenance.hashing import sha256_file
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
    """Train one model; keyed on the content of its inputs and exactly the settings it reads.

    Args:
        model: the model name.
        inputs: the stage's inputs (splits and manifest).
        params_path: the parameters file.
        settings: ``input``, ``train.common`` and ``train.<model>``.

    Returns:
        The model and card paths with their hashes, validation AUC and health status.
    """
    run_cxr(["train", "--model", model, "--splits", inputs[0]], params_path, settings)
    card_path = HERE.card(model)
    card = read_card(card_path)
    return {
        "model": HERE.model(model).as_posix(),
        "model_sha256": card.model_sha256,
        "card": card_path.as_posix(),
        "card_sha256": sha256_file(card_path),
        "val_auc": card.validation.get("auc"),
        "health": card.health.status if card.health else None,
    }
