"""Prefect tasks for evaluate, explain and report (wrapping ``cxr.evaluation.evaluate``, ``cxr.evaluation.explain``, ``cxr.reporting.report``).

Evaluate and explain load TensorFlow models, so they run ``cxr`` in a child process like training;
the report is plain Python and runs in the flow's process, then publishes Prefect artifacts.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from cxr.data.external_sets import index_external
from cxr.provenance.hashing import sha256_file
from cxr.reporting.report import build
from tasks.caching import ContentPolicy
from tasks.train import _cxr

EVAL_CODE = ("cxr/evaluation/evaluate.py", "cxr/evaluation/metrics.py", "cxr/inference/loading.py", "cxr/training/input_pipeline.py", "cxr/data/external_sets.py")
EXTERNAL_CODE = ("cxr/data/external_sets.py", "cxr/data/images.py", "cxr/data/kaggle_layout.py", "cxr/data/manifest.py")
ENSEMBLE_CODE = ("cxr/training/ensemble.py", "cxr/inference/loading.py", "cxr/training/input_pipeline.py", "cxr/training/health.py")


@task(name="external", cache_policy=ContentPolicy(code=EXTERNAL_CODE, path_inputs=("folder", "splits")),
      persist_result=True, task_run_name="external-{name}")
def external_task(name: str, folder: str, splits: str) -> dict[str, Any]:
    """Index one external validation set; keyed on the folder's content (and the split file, against
    whose train and validation images identical files and shared patients are reported)."""
    summary = index_external(name, folder, splits_csv=splits)
    index = f"data/external/{name}.csv"
    return {"index": index, "index_sha256": sha256_file(index), "images": summary["images"]}


@task(name="ensemble", cache_policy=ContentPolicy(code=ENSEMBLE_CODE, path_inputs=("model_files", "splits")),
      persist_result=True)
def ensemble_task(members: list[str], model_files: list[str], splits: str, params_path: str,
                  input_params: dict[str, Any], common: dict[str, Any], models: list[str]) -> dict[str, Any]:
    """Average the member models into ``ensemble/ensemble.keras`` (a child process, like training).

    With no members it still runs: it writes ``ensemble/ensemble.json`` saying so, the output the
    DVC ``ensemble`` stage declares, so ``dvc commit`` after a flow run finds every output."""
    # the members' health policy and threshold rule (train.common) apply to their average too
    _cxr(["ensemble", "--splits", splits], params_path,
         [f"ensemble={json.dumps({'members': members})}", f"input={json.dumps(input_params)}",
          f"train.common={json.dumps(common)}", f"train.models={json.dumps(models)}"])
    result = {"record": "ensemble/ensemble.json", "record_sha256": sha256_file("ensemble/ensemble.json")}
    if members:
        result.update(model="ensemble/ensemble.keras", model_sha256=sha256_file("ensemble/ensemble.keras"))
    return result
EXPLAIN_CODE = ("cxr/evaluation/explain.py", "cxr/evaluation/gradcam.py", "cxr/inference/loading.py")
REPORT_CODE = ("cxr/reporting/report.py", "cxr/evaluation/agreement.py")


@task(name="evaluate", cache_policy=ContentPolicy(code=EVAL_CODE, path_inputs=("splits", "model_files",
                                                                                 "external_indexes")),
      persist_result=True)
def evaluate_task(models: list[str], model_files: list[str], splits: str, params_path: str,
                  eval_params: dict[str, Any], input_params: dict[str, Any],
                  external_indexes: list[str] | None = None) -> dict[str, Any]:
    args = ["evaluate"] + [a for m in models for a in ("--model", m)]
    _cxr(args, params_path, [f"evaluate={json.dumps(eval_params)}", f"input={json.dumps(input_params)}"])
    return {"metrics": "reports/metrics.json", "metrics_sha256": sha256_file("reports/metrics.json"),
            "eval_dir": "reports/eval"}


@task(name="explain", cache_policy=ContentPolicy(code=EXPLAIN_CODE, path_inputs=("splits", "model_files",
                                                                                   "eval_dir")),
      persist_result=True)
def explain_task(models: list[str], model_files: list[str], splits: str, eval_dir: str, params_path: str,
                 eval_params: dict[str, Any], input_params: dict[str, Any]) -> dict[str, Any]:
    args = ["explain"] + [a for m in models for a in ("--model", m)]
    _cxr(args, params_path, [f"evaluate={json.dumps(eval_params)}", f"input={json.dumps(input_params)}"])
    return {"summary": "reports/gradcam/summary.json", "summary_sha256": sha256_file("reports/gradcam/summary.json")}


@task(name="report", cache_policy=ContentPolicy(code=REPORT_CODE, path_inputs=("inputs",)), persist_result=True)
def report_task(models: list[str], inputs: list[str], readers: str, eval_params: dict[str, Any]) -> dict[str, Any]:
    """Render the report and publish it as Prefect artifacts (keys stable, so the UI keeps history)."""
    result = build(models, readers, eval_params)
    create_markdown_artifact(key="cxr-report", markdown=result["markdown"],
                             description="Chest X-ray pipeline: data, metrics and warnings")
    create_table_artifact(key="cxr-metrics", table=result["rows"], description="Test metrics per model")
    return {"html": result["html"], "html_sha256": sha256_file(result["html"])}
