"""Prefect tasks for the ensemble, external sets, evaluate, explain and report stages.

Ensemble, evaluate and explain load TensorFlow models, so they run ``cxr`` in a child process like
training (:mod:`tasks.runner`); indexing external sets and the report are plain Python and run in
the flow's process; the report then publishes Prefect artifacts.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from cxr.config import EvaluateConfig, parse_section
from cxr.data.external_sets import index_external
from cxr.provenance.hashing import sha256_file
from cxr.reporting.report import build
from cxr.workspace import HERE
from tasks.caching import stage_policy
from tasks.runner import run_cxr


@task(
    name="external",
    cache_policy=stage_policy("external", path_inputs=("inputs",)),
    persist_result=True,
    task_run_name="external-{name}",
)
def external_task(name: str, inputs: list[str], settings: dict[str, Any]) -> dict[str, Any]:
    """Index one external validation set.

    Args:
        name: the set's name (a key of ``evaluate.external``).
        inputs: its folder, then the splits file (against whose train and validation images
            identical files and shared patients are reported).
        settings: ``data.link_roots`` (where links in the folder may lead).

    Returns:
        The index path, its hash and the image count.
    """
    folder, splits = inputs
    summary = index_external(name, folder, splits_csv=splits, extra_roots=settings["data.link_roots"] or ())
    index = HERE.external_index(name).as_posix()
    return {"index": index, "index_sha256": sha256_file(index), "images": summary["images"]}


@task(name="ensemble", cache_policy=stage_policy("ensemble", path_inputs=("inputs",)), persist_result=True)
def ensemble_task(inputs: list[str], params_path: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Average the member models into ``ensemble/ensemble.keras``.

    With no members it still runs: it writes ``ensemble/ensemble.json`` saying so, the output the
    DVC ``ensemble`` stage declares, so ``dvc commit`` after a flow run finds every output.

    Args:
        inputs: the splits file and the models folder.
        params_path: the parameters file.
        settings: ``ensemble``, ``input``, ``train.models``, ``train.common``.

    Returns:
        The record (and, with members, the model) with hashes.
    """
    run_cxr(["ensemble", "--splits", inputs[0]], params_path, settings)
    record = HERE.ensemble_record.as_posix()
    result = {"record": record, "record_sha256": sha256_file(record)}
    if settings["ensemble"]["members"]:
        model = HERE.ensemble_model.as_posix()
        result.update(model=model, model_sha256=sha256_file(model))
    return result


@task(name="evaluate", cache_policy=stage_policy("evaluate", path_inputs=("inputs",)), persist_result=True)
def evaluate_task(models: list[str], inputs: list[str], params_path: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Score every model on the test split and the external sets.

    Args:
        models: model names (the ensemble included when it has members).
        inputs: splits, external indexes, models and ensemble folders.
        params_path: the parameters file.
        settings: the evaluate stage's settings.

    Returns:
        The metrics file and its hash, and the per-model folder.
    """
    run_cxr(["evaluate", *[a for m in models for a in ("--model", m)]], params_path, settings)
    return {
        "metrics": HERE.metrics.as_posix(),
        "metrics_sha256": sha256_file(HERE.metrics),
        "eval_dir": HERE.eval.as_posix(),
    }


@task(name="explain", cache_policy=stage_policy("explain", path_inputs=("inputs",)), persist_result=True)
def explain_task(models: list[str], inputs: list[str], params_path: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Grad-CAM galleries on the test split.

    Args:
        models: the trained models (not the ensemble: Grad-CAM needs one network).
        inputs: splits, models folder and evaluation folder.
        params_path: the parameters file.
        settings: the explain stage's settings.

    Returns:
        The summary file and its hash.
    """
    run_cxr(["explain", *[a for m in models for a in ("--model", m)]], params_path, settings)
    return {"summary": HERE.gradcam_summary.as_posix(), "summary_sha256": sha256_file(HERE.gradcam_summary)}


@task(name="report", cache_policy=stage_policy("report", path_inputs=("inputs",)), persist_result=True)
def report_task(models: list[str], inputs: list[str], settings: dict[str, Any]) -> dict[str, Any]:
    """Render the report and publish it as Prefect artifacts (keys stable, so the UI keeps history).

    Args:
        models: the scored models.
        inputs: everything the report reads.
        settings: the report stage's settings (``report``, ``evaluate``, ...).

    Returns:
        The HTML path and its hash.
    """
    evaluate = parse_section(EvaluateConfig, settings["evaluate"], "evaluate")
    result = build(models, str(settings["report"]["readers"] or ""), evaluate)
    create_markdown_artifact(
        key="cxr-report", markdown=result["markdown"], description="Chest X-ray pipeline: data, metrics and warnings"
    )
    create_table_artifact(key="cxr-metrics", table=result["rows"], description="Test metrics per model")
    return {"html": result["html"], "html_sha256": sha256_file(result["html"])}
