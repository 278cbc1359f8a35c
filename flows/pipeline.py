"""The pipeline flow: fetch → prepare → preview + train (one task per model) → ensemble → external sets
→ evaluate → explain → report.

Run it with ``python -m flows.pipeline [-S key=value ...]``. With no ``PREFECT_API_URL`` Prefect
starts a temporary local server for the run; with one, the run is recorded on that server.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

import flows  # noqa: F401  (environment defaults before Prefect is imported)
from cxr.config import load_params, section
from cxr.data.external_sets import external_sets
from cxr.data.fetch import source_digest
from cxr.errors import CxrError
from cxr.inference.loading import card_path_for
from cxr.logs import setup_logging
from cxr.training.ensemble import members_of
from tasks.caching import outputs_intact
from tasks.evaluate import ensemble_task, evaluate_task, explain_task, external_task, report_task
from tasks.fetch import fetch_task
from tasks.prepare import prepare_task
from tasks.train import preview_task, train_task

log = logging.getLogger("flows.pipeline")


def _verified(task_obj: Any, state: Any, kwargs: dict[str, Any]) -> tuple[str, Any]:
    """Trust a cached result only if the files it names are intact; otherwise run the task again."""
    result = state.result()
    if state.is_completed() and state.name == "Cached" and not outputs_intact(result):
        state = task_obj.with_options(refresh_cache=True)(**kwargs, return_state=True)
        result = state.result()
    label = f"{task_obj.name}@{kwargs['model']}" if "model" in kwargs else task_obj.name
    log.info("%s: %s", label, state.name)
    return state.name, result


def run_verified(task_obj: Any, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """Run a task in the flow's thread; see :func:`_verified`."""
    return _verified(task_obj, task_obj(**kwargs, return_state=True), kwargs)


def sync_dvc_lock(overrides: list[str] | None) -> str:
    """Record in ``dvc.lock`` what this run produced, so ``dvc status`` agrees with the files on disk.

    Only when the run used ``params.yaml`` as it is: with overrides, the lock would describe
    parameters the outputs were not made with, so it is left alone (and says so).
    """
    if overrides:
        log.warning("dvc.lock not updated: this run used overrides %s; run dvc repro to realign", overrides)
        return "skipped (overrides)"
    if not (Path("dvc.yaml").is_file() and Path(".dvc").is_dir()):
        return "skipped (no DVC project)"
    proc = subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet"], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        log.warning("dvc commit failed: %s", (proc.stderr.strip().splitlines() or ["?"])[-1])
        return "failed"
    return "committed"


@flow(name="cxr-pipeline", log_prints=False)
def pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None,
             refresh_source: bool = False) -> dict[str, Any]:
    """Run every step; flow parameters (``overrides``) win over ``params.yaml``.

    ``refresh_source`` re-fetches even when the fetch task is cached (scheduled runs: a new Kaggle
    version or new files then flow through; unchanged data leaves every later task cached).

    Models train as separate tasks (each in its own process) and concurrently up to
    ``orchestration.max_parallel_training``; a failed model fails the run only after the others
    finished and kept their results.
    """
    params = load_params(params_path, overrides or [])
    data = section(params, "data")
    states: dict[str, str] = {}
    fetch = fetch_task.with_options(refresh_cache=True) if refresh_source else fetch_task
    states["fetch"], fetched = run_verified(fetch, data=data, source_digest=source_digest(data))
    states["prepare"], prepared = run_verified(
        prepare_task, raw_dir=fetched["raw"], split_params=section(params, "split"),
        prepare_params=params.get("prepare") or {},
    )
    train_params = section(params, "train")
    input_params = params.get("input") or {}
    common = train_params.get("common") or {}
    states["preview"], _ = run_verified(preview_task, splits=prepared["splits"], params_path=params_path,
                                        input_params=input_params, seed=int(common.get("seed", 42)))
    jobs = {}
    for model in train_params.get("models") or []:
        kwargs = {"model": model, "splits": prepared["splits"], "params_path": params_path,
                  "input_params": input_params, "common": common, "own": train_params.get(model) or {}}
        jobs[model] = (kwargs, train_task.submit(**kwargs, return_state=False))
    models: dict[str, Any] = {}
    failures = []
    for model, (kwargs, future) in jobs.items():
        future.wait()
        state = future.state
        if state.is_failed():
            failures.append(f"{model}: {state.message}")
            states[f"train@{model}"] = "Failed"
            log.error("train@%s failed: %s", model, state.message)
            continue
        states[f"train@{model}"], models[model] = _verified(train_task, state, kwargs)
    if failures:
        raise CxrError("training failed for " + "; ".join(failures) + " (other models were kept)")
    names = list(models)
    files = [f"models/{m}.keras" for m in names]
    members = members_of(params)
    scored_names, scored_files = list(names), list(files)
    states["ensemble"], ensembled = run_verified(
        ensemble_task, members=members, model_files=[f"models/{m}.keras" for m in members],
        splits=prepared["splits"], params_path=params_path, input_params=input_params, common=common,
        models=list(train_params.get("models") or []))
    if members:
        scored_names.append("ensemble")
        scored_files.append(ensembled["model"])
    eval_params = params.get("evaluate") or {}
    indexes = []
    for set_name, folder in external_sets(eval_params).items():
        states[f"external@{set_name}"], indexed = run_verified(external_task, name=set_name, folder=folder,
                                                               splits=prepared["splits"])
        indexes.append(indexed["index"])
    states["evaluate"], evaluated = run_verified(
        evaluate_task, models=scored_names, model_files=scored_files, splits=prepared["splits"],
        params_path=params_path, eval_params=eval_params, input_params=input_params, external_indexes=indexes)
    states["explain"], explained = run_verified(
        explain_task, models=names, model_files=files, splits=prepared["splits"], eval_dir=evaluated["eval_dir"],
        params_path=params_path, eval_params=eval_params, input_params=input_params)
    report_inputs = [prepared["quality"], evaluated["metrics"], explained["summary"], *scored_files,
                     *[str(card_path_for(Path(f))) for f in scored_files]]
    names = scored_names
    readers = str((params.get("report") or {}).get("readers") or "")
    states["report"], reported = run_verified(report_task, models=names, inputs=report_inputs, readers=readers,
                                              eval_params=eval_params)
    states["dvc.lock"] = sync_dvc_lock(overrides)
    return {"states": states, "fetch": fetched, "prepare": prepared, "models": models, "report": reported}


def pipeline_with_runner(max_parallel: int = 1, dask_address: str | None = None) -> Any:
    """The flow with its task runner: local threads (``max_parallel``) or an existing Dask cluster.

    On Dask, each training task (a ``cxr train`` child process) runs on a cluster worker; workers
    must see the same repository checkout (a shared file system or the same path on every host).
    """
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return pipeline.with_options(task_runner=DaskTaskRunner(address=dask_address))
    return pipeline.with_options(task_runner=ThreadPoolTaskRunner(max_workers=max(1, max_parallel)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--dask", metavar="ADDRESS", help="run tasks on this Dask scheduler (tcp://host:8786)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        params = load_params(args.params, args.set)
        parallel = int((params.get("orchestration") or {}).get("max_parallel_training", 1))
        result = pipeline_with_runner(parallel, args.dask)(params_path=args.params, overrides=args.set)
    except CxrError as exc:
        print(f"cxr: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result["states"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
