"""Prefect tasks for the input preview and for training one model.

Training runs ``cxr train --model NAME`` in a child process: each model gets its own TensorFlow
runtime (global seeds, precision policy and memory are per process), several models can train
concurrently, and the code path is exactly the one ``dvc repro`` runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import task

from cxr.errors import CxrError
from cxr.provenance.hashing import sha256_file
from tasks.caching import ContentPolicy

TRAIN_CODE = ("cxr/training/train.py", "cxr/training/models.py", "cxr/training/input_pipeline.py", "cxr/training/augment.py", "cxr/training/health.py")
PREVIEW_CODE = ("cxr/training/preview.py", "cxr/training/input_pipeline.py", "cxr/training/augment.py", "cxr/reporting/plots.py")


def _cxr(args: list[str], params_path: str, overrides: list[str]) -> str:
    command = [sys.executable, "-m", "cxr", *args, "--params", params_path]
    for item in overrides:
        command += ["-S", item]
    from prefect.runtime import flow_run

    env = {**os.environ, "CXR_NO_PROGRESS": "1"}
    if flow_run.id:  # recorded in the model card and the lineage log
        env.update(CXR_PREFECT_FLOW_RUN=str(flow_run.id), CXR_PREFECT_FLOW_RUN_NAME=str(flow_run.name))
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CxrError(f"cxr {' '.join(args)} failed: {last}")
    return proc.stdout


def _overrides(section: dict[str, Any], prefix: str) -> list[str]:
    return [f"{prefix}={json.dumps(section)}"]


@task(name="preview", cache_policy=ContentPolicy(code=PREVIEW_CODE, path_inputs=("splits",)),
      persist_result=True)
def preview_task(splits: str, params_path: str, input_params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Plot one augmented training batch (and warm the decoded-image cache)."""
    out = "reports/plots/augmented_batch.png"
    _cxr(["preview", "--splits", splits, "--out", out], params_path,
         [*_overrides(input_params, "input"), f"train.common.seed={seed}"])
    return {"plot": out}


@task(name="train", cache_policy=ContentPolicy(code=TRAIN_CODE, path_inputs=("splits",)),
      persist_result=True, task_run_name="train-{model}")
def train_task(model: str, splits: str, params_path: str, input_params: dict[str, Any],
               common: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """Train one model; keyed on the splits' content and exactly the params this model reads."""
    overrides = [*_overrides(input_params, "input"), *_overrides(common, "train.common"),
                 *_overrides(own, f"train.{model}")]
    _cxr(["train", "--model", model, "--splits", splits], params_path, overrides)
    card_path = Path("models") / f"{model}.card.json"
    card = json.loads(card_path.read_text())
    return {"model": f"models/{model}.keras", "model_sha256": card["model_sha256"],
            "card": card_path.as_posix(), "card_sha256": sha256_file(card_path),
            "val_auc": card["validation"]["auc"], "health": card["health"]["status"]}

